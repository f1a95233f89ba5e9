//! `GET /v1/documents/{collection}/{id}`: a document as the write model holds it (the
//! processor's `documents` table). The gateway uses it when the Redis read model misses, so
//! it answers the same shape: `{collection, id, version, data, updatedAt}` with
//! `ETag: "<version>"`, and `If-None-Match` with that tag (or `*`) gets `304 Not Modified`.
//! A deleted or never-written document is `404` (`not-found`); one the caller's `read` claim
//! does not cover is `403` (`forbidden`), whether it exists or not.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use common::access::Action;
use serde::Serialize;
use serde_json::Value;

use crate::AppState;
use crate::caller::Caller;
use crate::error::{ApiError, Path};

/// `/v1/documents` routes.
pub fn router(state: &AppState) -> Router {
    Router::new()
        .route("/v1/documents/{collection}/{id}", get(document))
        .with_state(state.clone())
}

/// A live document.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct DocumentBody {
    collection: String,
    id: String,
    version: i64,
    data: sqlx::types::Json<Value>,
    #[serde(serialize_with = "rfc3339")]
    updated_at: DateTime<Utc>,
}

fn rfc3339<S: serde::Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

#[tracing::instrument(skip_all, fields(collection = %collection, id = %id))]
async fn document(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path((collection, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match caller {
        Ok(caller) => caller.authorize(Action::Read, &collection, &id)?,
        // Tokens are not verified and reads need no owner: nothing to check.
        Err(ApiError::MissingClientId) => {}
        Err(error) => return Err(error),
    }
    let found: Option<DocumentBody> = sqlx::query_as(
        "SELECT collection, id, version, data, updated_at FROM documents \
         WHERE collection = $1 AND id = $2 AND NOT deleted",
    )
    .bind(&collection)
    .bind(&id)
    .fetch_optional(state.db.pool())
    .await?;
    let document = found.ok_or(ApiError::NotFound)?;
    let etag = format!("\"{}\"", document.version);
    let tag = HeaderValue::from_str(&etag).map_err(|_| ApiError::NotFound)?;
    let mut response = if not_modified(&headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(document).into_response()
    };
    response.headers_mut().insert(header::ETAG, tag);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_matches_the_tag_a_list_or_a_star() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static(value));
            headers
        };
        assert!(not_modified(&with("\"3\""), "\"3\""));
        assert!(not_modified(&with("\"1\", W/\"3\""), "\"3\""));
        assert!(not_modified(&with("*"), "\"3\""));
        assert!(!not_modified(&with("\"2\""), "\"3\""));
        assert!(!not_modified(&HeaderMap::new(), "\"3\""));
    }
}
