//! `GET /v1/documents/{collection}/{id}` from the Redis read model (`common::readmodel`),
//! with the command service's write model as the fallback.
//!
//! - `Found` → 200 with the write model's body (`{collection, id, version, data,
//!   updatedAt}`), `ETag: "<version>"` (304 on a matching
//!   `If-None-Match`), `X-Cache: hit`;
//! - `Deleted` (tombstone) → 404 problem `not-found`, `X-Cache: hit`;
//! - `Missing`, or Redis unavailable / slower than `REDIS_TIMEOUT_MS` → the request is
//!   forwarded upstream and its answer returned with `X-Cache: miss`.
//!
//! Other methods are forwarded upstream unchanged. On a route requiring a token, a document
//! the token's `read` claim does not cover is `403` (`forbidden`) before any lookup.

use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::access::{self, Action, Grants};
use common::metrics::GATEWAY_READ_MODEL_LOOKUPS_TOTAL;
use common::problem::{Problem, ProblemType};
use common::readmodel::{self, Lookup};

use crate::proxy::Caller;
use crate::routes::Route;
use crate::{AppState, NAME};

/// `X-Cache`: `hit` when the read model answered, `miss` when the write model did.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Serves one document request; with `grants` (a route requiring a token), only a document
/// the token's `read` claim covers (403 otherwise, before any lookup).
pub async fn serve(
    state: &AppState,
    route: &Route,
    caller: &Caller,
    grants: Option<&Grants>,
    request: Request,
) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return state
            .proxy
            .forward(&route.name, &route.upstream, caller, request)
            .await;
    }
    let (mut parts, body) = request.into_parts();
    let params = RawPathParams::from_request_parts(&mut parts, &()).await;
    let request = Request::from_parts(parts, body);
    let (mut collection, mut id) = (None, None);
    if let Ok(params) = &params {
        for (name, value) in params {
            match name {
                "collection" => collection = Some(value.to_owned()),
                "id" => id = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    let (Some(collection), Some(id)) = (collection, id) else {
        return miss(state, route, caller, request).await;
    };
    if let Some(grants) = grants
        && !grants.can_read(&collection, &id)
    {
        return access::denied(NAME, Action::Read, &collection, &id);
    }

    let lookup = match state.redis.connection() {
        Ok(mut conn) => tokio::time::timeout(
            state.redis.timeout(),
            readmodel::read_with_time(&mut conn, &state.settings.redis_prefix, &collection, &id),
        )
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|result| result.map_err(|e| e.to_string())),
        Err(error) => Err(error.to_string()),
    };
    match lookup {
        Ok((Lookup::Found { version, data }, updated_at)) => {
            record("hit");
            // The same body as the write model's answer, so a client cannot tell a hit from
            // a miss except by `X-Cache`.
            let mut body = serde_json::json!({
                "collection": collection, "id": id, "version": version, "data": data,
            });
            if let (Some(at), Some(map)) = (updated_at, body.as_object_mut()) {
                map.insert("updatedAt".to_owned(), serde_json::Value::String(at));
            }
            found(&request, version, &body)
        }
        Ok((Lookup::Deleted { .. }, _)) => {
            record("deleted");
            let mut response = Problem::new(ProblemType::NotFound, StatusCode::NOT_FOUND)
                .detail(format!("document {collection}/{id} was deleted"))
                .into_response();
            response
                .headers_mut()
                .insert(X_CACHE, HeaderValue::from_static("hit"));
            response
        }
        Ok((Lookup::Missing, _)) => {
            record("miss");
            miss(state, route, caller, request).await
        }
        Err(error) => {
            record("error");
            tracing::warn!(%error, collection, id, "Read model unavailable; asking the write model.");
            miss(state, route, caller, request).await
        }
    }
}

fn found(request: &Request, version: i64, body: &serde_json::Value) -> Response {
    let etag = format!("\"{version}\"");
    let not_modified = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag);
    // For HEAD, hyper sends the headers (Content-Length included) without the body.
    let body = if not_modified {
        Body::empty()
    } else {
        Body::from(body.to_string())
    };
    let status = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    if !not_modified {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(X_CACHE, HeaderValue::from_static("hit"));
    response
}

async fn miss(state: &AppState, route: &Route, caller: &Caller, request: Request) -> Response {
    let mut response = state
        .proxy
        .forward(&route.name, &route.upstream, caller, request)
        .await;
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static("miss"));
    response
}

fn record(result: &'static str) {
    metrics::counter!(GATEWAY_READ_MODEL_LOOKUPS_TOTAL, "service" => NAME, "result" => result)
        .increment(1);
}
