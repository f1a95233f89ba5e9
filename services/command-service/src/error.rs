//! [`ApiError`]: every way a request can fail, rendered as `application/problem+json`, and
//! [`Json`] and [`Path`], the extractors whose rejection is an [`ApiError`] (so malformed JSON,
//! wrong types, oversize bodies and undecodable paths get our problem body, not axum's plain
//! text).

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::access::{self, Action};
use common::auth::AuthError;
use common::problem::{Problem, ProblemType};

use crate::NAME;

/// Why a request failed. 4xx variants carry text that is safe for clients; 5xx variants carry
/// the cause, which is logged and never returned.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The body was not declared as `application/json`.
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    /// The JSON does not describe a valid request.
    #[error("{0}")]
    Validation(String),
    /// A header is malformed.
    #[error("{0}")]
    InvalidHeader(String),
    /// A path segment does not decode (for example percent-encoded bytes that are not UTF-8).
    #[error("invalid path: {0}")]
    InvalidPath(String),
    /// The body exceeds `COMMANDS_MAX_BODY_BYTES`.
    #[error("the body exceeds the configured limit")]
    PayloadTooLarge,
    /// No `Idempotency-Key` header.
    #[error("the Idempotency-Key header is required")]
    IdempotencyKeyMissing,
    /// The key was used for a different request.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    /// The first request with this key has not finished.
    #[error("the first request with this Idempotency-Key is still being processed")]
    IdempotencyInProgress,
    /// No `X-Client-Id` header (tokens are not verified).
    #[error("the X-Client-Id header is required")]
    MissingClientId,
    /// No bearer token (tokens are verified).
    #[error("a bearer token is required")]
    TokenMissing,
    /// The bearer token was refused.
    #[error(transparent)]
    TokenRefused(AuthError),
    /// The token's grants do not cover the document.
    #[error("the token's `{}` claim does not cover {collection}/{id}", .action.claim())]
    Forbidden {
        /// What was asked.
        action: Action,
        /// The document's collection.
        collection: String,
        /// The document's id.
        id: String,
    },
    /// No such resource.
    #[error("not found")]
    NotFound,
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The service is stopping and no longer writes commands.
    #[error("the service is shutting down")]
    ShuttingDown,
}

impl ApiError {
    /// The problem type and status of this error.
    pub fn problem(&self) -> Problem {
        use ProblemType as P;
        let (kind, status) = match self {
            Self::InvalidJson(_) => (P::InvalidJson, StatusCode::BAD_REQUEST),
            Self::UnsupportedMediaType => (P::InvalidJson, StatusCode::UNSUPPORTED_MEDIA_TYPE),
            Self::Validation(_) => (P::ValidationFailed, StatusCode::UNPROCESSABLE_ENTITY),
            Self::InvalidHeader(_) | Self::InvalidPath(_) => {
                (P::ValidationFailed, StatusCode::BAD_REQUEST)
            }
            Self::PayloadTooLarge => (P::PayloadTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            Self::IdempotencyKeyMissing => (P::IdempotencyKeyMissing, StatusCode::BAD_REQUEST),
            Self::IdempotencyKeyReused => {
                (P::IdempotencyKeyReused, StatusCode::UNPROCESSABLE_ENTITY)
            }
            Self::IdempotencyInProgress => (P::IdempotencyInProgress, StatusCode::CONFLICT),
            Self::MissingClientId | Self::TokenMissing => {
                (P::Unauthorized, StatusCode::UNAUTHORIZED)
            }
            Self::TokenRefused(error) if error.is_unavailable() => {
                (P::DependencyUnavailable, StatusCode::SERVICE_UNAVAILABLE)
            }
            Self::TokenRefused(_) => (P::Unauthorized, StatusCode::UNAUTHORIZED),
            Self::Forbidden { .. } => (P::Forbidden, StatusCode::FORBIDDEN),
            Self::NotFound => (P::NotFound, StatusCode::NOT_FOUND),
            Self::Database(error) if is_unavailable(error) => {
                (P::DependencyUnavailable, StatusCode::SERVICE_UNAVAILABLE)
            }
            Self::Database(_) => (P::Internal, StatusCode::INTERNAL_SERVER_ERROR),
            Self::ShuttingDown => (P::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
        };
        let problem = Problem::new(kind, status);
        if status.is_server_error() {
            problem // internals never reach clients
        } else {
            problem.detail(self.to_string())
        }
    }
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            // 401s carry the RFC 6750 challenge; 403s are counted like the gateway's.
            Self::TokenMissing => return common::problem::unauthorized(&self.to_string(), None),
            Self::TokenRefused(error) if !error.is_unavailable() => {
                return common::problem::unauthorized(&self.to_string(), Some("invalid_token"));
            }
            Self::Forbidden {
                action,
                collection,
                id,
            } => return access::denied(NAME, *action, collection, id),
            _ => {}
        }
        let problem = self.problem();
        if problem.status.is_server_error() {
            tracing::error!(error = %self, status = problem.status.as_u16(), "Request failed.");
        }
        problem.into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::Validation(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::InvalidJson(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            other => Self::InvalidJson(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::InvalidPath(rejection.body_text())
    }
}

/// `axum::extract::Path` with [`ApiError`] as its rejection.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::Json` with [`ApiError`] as its rejection.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_carry_detail_and_server_errors_hide_their_cause() {
        let problem = ApiError::Validation("unknown command type \"x\"".into()).problem();
        assert_eq!(problem.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            problem.detail.as_deref(),
            Some("unknown command type \"x\"")
        );

        let problem =
            ApiError::Database(sqlx::Error::Protocol("secret internals".into())).problem();
        assert_eq!(problem.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(problem.kind, ProblemType::Internal);
        assert_eq!(problem.detail, None);
    }

    #[test]
    fn an_exhausted_pool_is_a_dependency_problem() {
        let problem = ApiError::Database(sqlx::Error::PoolTimedOut).problem();
        assert_eq!(problem.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(problem.kind, ProblemType::DependencyUnavailable);
    }
}
