//! Who is calling, and what they may do.
//!
//! With a JWT key configured (`JWT_SECRET`, `JWT_PUBLIC_KEY` or `JWT_JWKS_URL`, the same
//! settings as the gateway's), every request must carry the caller's bearer token — the
//! gateway forwards it — and the service verifies it itself: the caller is the token's `sub`,
//! and its `read`/`write` claims ([`common::access`]) decide which documents it may read and
//! send commands for. `X-Client-Id` is ignored then, so no other pod can act as someone
//! else by setting a header.
//!
//! Without a key (development, or a stack without `spec.auth`) nothing can be verified: the
//! caller is the `X-Client-Id` header and nothing is restricted.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use common::access::{Action, Grants};
use common::auth::bearer_token;
use common::metrics::JWT_FAILURES_TOTAL;

use crate::error::ApiError;
use crate::{AppState, NAME};

/// The header naming the calling client when no JWT key is configured.
pub const CLIENT_ID: &str = "x-client-id";

/// The caller of one request.
#[derive(Debug)]
pub struct Caller {
    /// The token's `sub` (or `X-Client-Id`): the idempotency scope and the command owner.
    pub subject: String,
    /// What the token allows; `None` when tokens are not verified (nothing is restricted).
    grants: Option<Grants>,
}

impl Caller {
    /// `Ok` when the caller may do `action` on the document `collection`/`id`.
    pub fn authorize(&self, action: Action, collection: &str, id: &str) -> Result<(), ApiError> {
        let allowed = match (&self.grants, action) {
            (None, _) => true,
            (Some(grants), Action::Read) => grants.can_read(collection, id),
            (Some(grants), Action::Write) => grants.can_write(collection, id),
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                action,
                collection: collection.to_owned(),
                id: id.to_owned(),
            })
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !state.verifier.is_enabled() {
            return from_header(parts);
        }
        let Some(token) = bearer_token(&parts.headers) else {
            metrics::counter!(JWT_FAILURES_TOTAL, "service" => NAME, "reason" => "missing")
                .increment(1);
            return Err(ApiError::TokenMissing);
        };
        match state.verifier.verify(token).await {
            Ok(claims) => Ok(Self {
                grants: Some(Grants::from_claims(&claims)),
                subject: claims.sub,
            }),
            Err(error) => {
                metrics::counter!(JWT_FAILURES_TOTAL, "service" => NAME, "reason" => error.reason())
                    .increment(1);
                Err(ApiError::TokenRefused(error))
            }
        }
    }
}

fn from_header(parts: &Parts) -> Result<Caller, ApiError> {
    let value = parts
        .headers
        .get(CLIENT_ID)
        .ok_or(ApiError::MissingClientId)?;
    let value = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .ok_or_else(|| {
            ApiError::InvalidHeader("X-Client-Id must be 1 to 255 visible ASCII characters".into())
        })?;
    Ok(Caller {
        subject: value.to_owned(),
        grants: None,
    })
}

#[cfg(test)]
mod tests {
    use common::auth::Claims;

    use super::*;

    #[test]
    fn an_unverified_caller_is_unrestricted_and_a_verified_one_needs_grants() {
        let open = Caller {
            subject: "anyone".into(),
            grants: None,
        };
        assert!(open.authorize(Action::Write, "orders", "1").is_ok());
        let claims = Claims {
            sub: "alice".into(),
            client_id: None,
            rooms: Vec::new(),
            read: vec!["orders/*".into()],
            write: vec!["orders/alice-*".into()],
            exp: 0,
            iss: None,
        };
        let alice = Caller {
            subject: "alice".into(),
            grants: Some(Grants::from_claims(&claims)),
        };
        assert!(alice.authorize(Action::Read, "orders", "bob-1").is_ok());
        assert!(alice.authorize(Action::Write, "orders", "alice-1").is_ok());
        let refused = alice
            .authorize(Action::Write, "orders", "bob-1")
            .unwrap_err();
        assert_eq!(refused.problem().status.as_u16(), 403);
        assert!(alice.authorize(Action::Read, "users", "1").is_err());
    }
}
