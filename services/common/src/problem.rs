//! Problem details for HTTP APIs (RFC 9457): the platform's problem types and a response
//! rendered as `application/problem+json`. Each service's `ApiError` maps its variants onto a
//! [`Problem`]; this module owns the wire format and the stable `type` URIs.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Media type of problem responses.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// The stable problem types (`type` = `https://meridian.dev/problems/<slug>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// The body is not JSON (or not declared as JSON).
    InvalidJson,
    /// The JSON is well-formed but not a valid request.
    ValidationFailed,
    /// The body exceeds the configured limit.
    PayloadTooLarge,
    /// A request that must carry an `Idempotency-Key` has none.
    IdempotencyKeyMissing,
    /// An `Idempotency-Key` was reused with a different request.
    IdempotencyKeyReused,
    /// The first request with this `Idempotency-Key` is still being processed.
    IdempotencyInProgress,
    /// The caller is not identified.
    Unauthorized,
    /// The caller may not do this.
    Forbidden,
    /// Too many requests.
    RateLimited,
    /// No such resource.
    NotFound,
    /// `expectedVersion` did not match.
    VersionConflict,
    /// A dependency (database, broker) is unavailable; retry later.
    DependencyUnavailable,
    /// This node is at a configured limit (the hub's connection limit); retry later, or on
    /// another replica.
    CapacityExceeded,
    /// This node is shutting down; retry, another replica answers.
    ShuttingDown,
    /// Anything else (details are logged, never returned).
    Internal,
}

impl ProblemType {
    /// The slug after `https://meridian.dev/problems/`.
    pub fn slug(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid-json",
            Self::ValidationFailed => "validation-failed",
            Self::PayloadTooLarge => "payload-too-large",
            Self::IdempotencyKeyMissing => "idempotency-key-missing",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
            Self::IdempotencyInProgress => "idempotency-in-progress",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate-limited",
            Self::NotFound => "not-found",
            Self::VersionConflict => "version-conflict",
            Self::DependencyUnavailable => "dependency-unavailable",
            Self::CapacityExceeded => "capacity-exceeded",
            Self::ShuttingDown => "shutting-down",
            Self::Internal => "internal",
        }
    }

    /// The full `type` URI.
    pub fn uri(self) -> String {
        format!("https://meridian.dev/problems/{}", self.slug())
    }

    /// A short, fixed summary of the type (the `title` member).
    pub fn title(self) -> &'static str {
        match self {
            Self::InvalidJson => "The request body is not valid JSON",
            Self::ValidationFailed => "The request is not valid",
            Self::PayloadTooLarge => "The request body is too large",
            Self::IdempotencyKeyMissing => "The Idempotency-Key header is required",
            Self::IdempotencyKeyReused => "The Idempotency-Key was used for a different request",
            Self::IdempotencyInProgress => "A request with this Idempotency-Key is in progress",
            Self::Unauthorized => "The caller is not identified",
            Self::Forbidden => "The caller may not do this",
            Self::RateLimited => "Too many requests",
            Self::NotFound => "Not found",
            Self::VersionConflict => "The expected version does not match",
            Self::DependencyUnavailable => "A dependency is unavailable",
            Self::CapacityExceeded => "This node is at its capacity",
            Self::ShuttingDown => "This node is shutting down",
            Self::Internal => "Internal error",
        }
    }
}

/// One problem response. Build it with [`Problem::new`] and add a `detail` that is safe to
/// show to clients (never an internal error's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The problem type.
    pub kind: ProblemType,
    /// The HTTP status.
    pub status: StatusCode,
    /// A human-readable explanation specific to this occurrence.
    pub detail: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

impl Problem {
    /// A problem of `kind` answered with `status`.
    pub fn new(kind: ProblemType, status: StatusCode) -> Self {
        Self {
            kind,
            status,
            detail: None,
        }
    }

    /// Adds the occurrence-specific `detail`.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            kind: self.kind.uri(),
            title: self.kind.title(),
            status: self.status.as_u16(),
            detail: self.detail.as_deref(),
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        response
    }
}

/// A 503 problem of `kind` with `Retry-After: 1`: this node cannot take the request now, a
/// retry (here or on another replica) can.
pub fn retry_later(kind: ProblemType, detail: impl Into<String>) -> Response {
    let mut response = Problem::new(kind, StatusCode::SERVICE_UNAVAILABLE)
        .detail(detail)
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The realm of the platform's bearer challenges.
pub const REALM: &str = "meridian";

/// 401 `unauthorized` with an RFC 6750 `WWW-Authenticate: Bearer` challenge; `error` (for
/// example `invalid_token`) adds `error` and `error_description` (the detail, reduced to the
/// printable ASCII the RFC allows there). Every service that takes bearer tokens answers with
/// it, as RFC 9110 requires of a 401.
pub fn unauthorized(detail: &str, error: Option<&str>) -> Response {
    let mut challenge = format!("Bearer realm=\"{REALM}\"");
    if let Some(error) = error {
        let description: String = detail
            .chars()
            .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
            .collect();
        challenge.push_str(&format!(
            ", error=\"{error}\", error_description=\"{description}\""
        ));
    }
    let mut response = Problem::new(ProblemType::Unauthorized, StatusCode::UNAUTHORIZED)
        .detail(detail)
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_401_carries_a_bearer_challenge() {
        let response = unauthorized("the token has \"expired\"", Some("invalid_token"));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"meridian\", error=\"invalid_token\", \
             error_description=\"the token has expired\""
        );
        let missing = unauthorized("a bearer token is required", None);
        assert_eq!(
            missing.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"meridian\""
        );
        assert_eq!(missing.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    }

    #[test]
    fn a_problem_renders_its_type_uri_title_status_and_detail() {
        let body = Problem::new(ProblemType::PayloadTooLarge, StatusCode::PAYLOAD_TOO_LARGE)
            .detail("limit is 10 bytes")
            .body();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "https://meridian.dev/problems/payload-too-large",
                "title": "The request body is too large",
                "status": 413,
                "detail": "limit is 10 bytes",
            })
        );
    }

    #[test]
    fn a_problem_response_is_problem_json() {
        let response = Problem::new(ProblemType::NotFound, StatusCode::NOT_FOUND).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    }
}
