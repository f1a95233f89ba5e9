//! Who is calling: the bearer token checked with [`common::auth`], per the route's
//! [`AuthMode`], and the 401 answer (RFC 6750 `WWW-Authenticate` + problem+json).

use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use common::auth::{AuthError, Claims, Verifier, bearer_token};
use common::metrics::JWT_FAILURES_TOTAL;
use common::problem::{Problem, ProblemType};

use crate::routes::AuthMode;

/// The header naming the calling client upstream (the command service scopes idempotency
/// keys by it). Set from the JWT subject; a caller-supplied value is dropped when a token is
/// present.
pub const X_CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");

/// The caller's identity for one request.
#[derive(Debug, Clone)]
pub enum Identity {
    /// No token (or a route that ignores tokens).
    Anonymous,
    /// A verified token.
    User(Claims),
}

impl Identity {
    /// The JWT subject, when authenticated.
    pub fn user(&self) -> Option<&str> {
        match self {
            Self::User(claims) => Some(&claims.sub),
            Self::Anonymous => None,
        }
    }

    /// The client id: the token's `client_id`/`azp`, or an anonymous caller's `X-Client-Id`.
    pub fn client<'a>(&'a self, headers: &'a HeaderMap) -> Option<&'a str> {
        match self {
            Self::User(claims) => claims.client_id.as_deref(),
            Self::Anonymous => headers.get(X_CLIENT_ID).and_then(|v| v.to_str().ok()),
        }
    }
}

/// Authenticates a request per `mode`; the error is the response to send.
pub async fn authenticate(
    service: &'static str,
    verifier: &Verifier,
    mode: AuthMode,
    headers: &HeaderMap,
) -> Result<Identity, Box<Response>> {
    if mode == AuthMode::None {
        return Ok(Identity::Anonymous);
    }
    let token = bearer_token(headers);
    let token = match (token, mode) {
        (Some(token), _) if verifier.is_enabled() => token,
        (_, AuthMode::Required) => {
            metrics::counter!(JWT_FAILURES_TOTAL, "service" => service, "reason" => "missing")
                .increment(1);
            let detail = if verifier.is_enabled() {
                "a bearer token is required"
            } else {
                "a bearer token is required, and token verification is not configured"
            };
            return Err(Box::new(unauthorized(detail, None)));
        }
        _ => return Ok(Identity::Anonymous),
    };
    match verifier.verify(token).await {
        Ok(claims) => Ok(Identity::User(claims)),
        Err(error) => {
            metrics::counter!(JWT_FAILURES_TOTAL, "service" => service, "reason" => error.reason())
                .increment(1);
            Err(Box::new(refused(&error)))
        }
    }
}

fn refused(error: &AuthError) -> Response {
    if error.is_unavailable() {
        tracing::warn!(%error, "Token verification keys are unavailable.");
        return Problem::new(
            ProblemType::DependencyUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .detail(error.to_string())
        .into_response();
    }
    unauthorized(&error.to_string(), Some("invalid_token"))
}

/// 401 with a problem body and an RFC 6750 challenge.
fn unauthorized(detail: &str, error: Option<&str>) -> Response {
    common::problem::unauthorized(detail, error)
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderValue, header};

    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        headers
    }

    #[test]
    fn a_refused_token_gets_an_rfc6750_challenge() {
        let response = refused(&AuthError::Expired);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"meridian\", error=\"invalid_token\", \
             error_description=\"the token has expired\""
        );
        // (The challenge itself is common::problem::unauthorized's, tested there.)
        assert_eq!(
            refused(&AuthError::JwksUnavailable).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn required_routes_refuse_anonymous_callers_and_none_routes_ignore_tokens() {
        let verifier = Verifier::disabled();
        let err = authenticate("t", &verifier, AuthMode::Required, &HeaderMap::new())
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        let anonymous = authenticate("t", &verifier, AuthMode::Optional, &headers("Bearer x"))
            .await
            .unwrap();
        assert!(matches!(anonymous, Identity::Anonymous));
        let ignored = authenticate("t", &verifier, AuthMode::None, &headers("Bearer x"))
            .await
            .unwrap();
        assert!(matches!(ignored, Identity::Anonymous));
    }
}
