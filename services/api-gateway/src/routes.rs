//! The route table: which path goes where, how, and whether a token is required.
//!
//! Read from `GATEWAY_ROUTES` (a JSON array) or `GATEWAY_ROUTES_FILE` (a file holding the same
//! array); without either, [`default_routes`] applies. Each entry:
//!
//! ```json
//! {"name": "commands", "path": "/v1/commands", "kind": "proxy",
//!  "upstream": "command-service", "auth": "required"}
//! ```
//!
//! - `name`: the route's label in metrics and its subject for `route` rate-limit policies.
//! - `path`: an axum path pattern. A `proxy` route also serves everything below it
//!   (`/v1/commands/…`); `documents` and `websocket` routes match exactly.
//! - `kind`: `proxy` (default), `documents` (`GET` served from the Redis read model, falling
//!   back to the upstream; the path must name `{collection}` and `{id}`), `websocket` (the
//!   upgrade is proxied and the connection tunnelled).
//! - `upstream`: `command-service` (`GATEWAY_COMMAND_SERVICE_URL`), `hub` (`GATEWAY_HUB_URL`)
//!   or an `http://` URL.
//! - `auth`: `required` (default: a valid bearer token or 401), `optional` (anonymous allowed,
//!   a token that is present must be valid), `none` (the gateway ignores tokens; the upstream
//!   authenticates, as the hub does for `/ws`).

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;
use url::Url;

/// What serves a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    /// Forwarded to the upstream (the path and everything below it).
    #[default]
    Proxy,
    /// `GET` from the Redis read model, other methods and misses forwarded to the upstream.
    Documents,
    /// A WebSocket upgrade, proxied and tunnelled to the upstream.
    WebSocket,
}

/// Whether a route needs a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A valid bearer token is required (401 otherwise).
    #[default]
    Required,
    /// Anonymous requests pass; a token that is present must be valid.
    Optional,
    /// Tokens are not looked at; the upstream authenticates.
    None,
}

/// One entry of the route table, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Metrics label and `route` rate-limit subject (`[A-Za-z0-9_.-]+`, unique).
    pub name: String,
    /// Axum path pattern (`/v1/commands`, `/v1/documents/{collection}/{id}`).
    pub path: String,
    /// What serves it.
    #[serde(default)]
    pub kind: RouteKind,
    /// `command-service`, `hub` or an `http://` base URL.
    pub upstream: String,
    /// Token requirement.
    #[serde(default)]
    pub auth: AuthMode,
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Metrics label and rate-limit subject.
    pub name: Arc<str>,
    /// The configured path pattern.
    pub path: String,
    /// What serves it.
    pub kind: RouteKind,
    /// The upstream's base URL (`http`, no query or fragment).
    pub upstream: Url,
    /// Token requirement.
    pub auth: AuthMode,
}

impl Route {
    /// The patterns to register: the path itself, and for a proxy route everything below it.
    pub fn patterns(&self) -> Vec<String> {
        match self.kind {
            RouteKind::Proxy if self.path == "/" => vec!["/".into(), "/{*rest}".into()],
            RouteKind::Proxy => vec![self.path.clone(), format!("{}/{{*rest}}", self.path)],
            RouteKind::Documents | RouteKind::WebSocket => vec![self.path.clone()],
        }
    }
}

/// Paths the gateway answers itself.
const RESERVED: [&str; 3] = ["/health", "/ready", "/metrics"];

/// The built-in table: commands and documents (token required) to the command service, `/ws`
/// to the hub (which authenticates the connection itself).
pub fn default_routes() -> Vec<RouteSpec> {
    let spec = |name: &str, path: &str, kind, upstream: &str, auth| RouteSpec {
        name: name.into(),
        path: path.into(),
        kind,
        upstream: upstream.into(),
        auth,
    };
    vec![
        spec(
            "commands",
            "/v1/commands",
            RouteKind::Proxy,
            "command-service",
            AuthMode::Required,
        ),
        spec(
            "documents",
            "/v1/documents/{collection}/{id}",
            RouteKind::Documents,
            "command-service",
            AuthMode::Required,
        ),
        spec("ws", "/ws", RouteKind::WebSocket, "hub", AuthMode::None),
    ]
}

/// The route table is unusable; the text says which entry and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid route table: {0}")]
pub struct RouteError(pub String);

/// Validates `specs`, resolving the named upstreams. Every problem is reported before
/// start-up, including path conflicts (checked with the router axum uses).
pub fn build(
    specs: &[RouteSpec],
    command_service: &Url,
    hub: &Url,
) -> Result<Vec<Route>, RouteError> {
    let mut names = HashSet::new();
    let mut matcher = matchit::Router::new();
    for reserved in RESERVED {
        matcher
            .insert(reserved, "(built in)".to_owned())
            .map_err(|e| RouteError(e.to_string()))?;
    }
    let mut routes = Vec::with_capacity(specs.len());
    for spec in specs {
        let fail = |why: String| RouteError(format!("route {:?}: {why}", spec.name));
        if spec.name.is_empty()
            || !spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(fail(
                "the name must be 1+ characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        if !names.insert(spec.name.as_str()) {
            return Err(fail("the name is used twice".into()));
        }
        if !spec.path.starts_with('/') || (spec.path.len() > 1 && spec.path.ends_with('/')) {
            return Err(fail(
                "the path must start with `/` and not end with one".into(),
            ));
        }
        // axum 0.8 refuses (panics on) segments written in the 0.7 syntax; say so instead.
        if let Some(segment) = spec
            .path
            .split('/')
            .find(|s| s.starts_with(':') || s.starts_with('*'))
        {
            return Err(fail(format!(
                "the path segment {segment:?} starts with `:` or `*`: write captures as \
                 `{{name}}` and the rest of a path as `{{*name}}`"
            )));
        }
        if spec.kind == RouteKind::Documents
            && !(spec.path.contains("{collection}") && spec.path.contains("{id}"))
        {
            return Err(fail(
                "a documents route's path must contain {collection} and {id}".into(),
            ));
        }
        let upstream = match spec.upstream.as_str() {
            "command-service" => command_service.clone(),
            "hub" => hub.clone(),
            other => Url::parse(other).map_err(|e| fail(format!("upstream: {e}")))?,
        };
        check_upstream(&upstream).map_err(fail)?;
        let route = Route {
            name: spec.name.as_str().into(),
            path: spec.path.clone(),
            kind: spec.kind,
            upstream,
            auth: spec.auth,
        };
        for pattern in route.patterns() {
            matcher
                .insert(pattern.as_str(), spec.name.clone())
                .map_err(|e| fail(format!("path {pattern:?}: {e}")))?;
        }
        routes.push(route);
    }
    Ok(routes)
}

/// Upstreams are plain-HTTP base URLs (in-cluster services); TLS is the mesh's or ingress's.
pub fn check_upstream(url: &Url) -> Result<(), String> {
    if url.scheme() != "http" {
        return Err(format!(
            "upstream {url} must be an http:// URL (TLS to upstreams is not supported)"
        ));
    }
    if url.host_str().is_none() {
        return Err(format!("upstream {url} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("upstream {url} must not have a query or fragment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls() -> (Url, Url) {
        (
            Url::parse("http://commands:8082").unwrap(),
            Url::parse("http://hub:8085").unwrap(),
        )
    }

    fn specs(json: serde_json::Value) -> Vec<RouteSpec> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_default_table_is_valid_and_resolves_named_upstreams() {
        let (commands, hub) = urls();
        let routes = build(&default_routes(), &commands, &hub).unwrap();
        let by_name = |name: &str| routes.iter().find(|r| &*r.name == name).unwrap();
        assert_eq!(by_name("commands").upstream, commands);
        assert_eq!(
            by_name("commands").patterns(),
            ["/v1/commands", "/v1/commands/{*rest}"]
        );
        assert_eq!(by_name("documents").kind, RouteKind::Documents);
        assert_eq!(by_name("ws").upstream, hub);
        assert_eq!(by_name("ws").auth, AuthMode::None);
    }

    #[test]
    fn entries_default_to_an_authenticated_proxy() {
        let parsed = specs(serde_json::json!([
            {"name": "things", "path": "/v1/things", "upstream": "http://things:80"}
        ]));
        assert_eq!(parsed[0].kind, RouteKind::Proxy);
        assert_eq!(parsed[0].auth, AuthMode::Required);
    }

    #[test]
    fn invalid_tables_are_rejected_with_the_route_named() {
        let (commands, hub) = urls();
        let cases = [
            (
                serde_json::json!([{"name": "a b", "path": "/x", "upstream": "hub"}]),
                "name",
            ),
            (
                serde_json::json!([
                    {"name": "a", "path": "/x", "upstream": "hub"},
                    {"name": "a", "path": "/y", "upstream": "hub"}
                ]),
                "twice",
            ),
            (
                serde_json::json!([{"name": "a", "path": "x", "upstream": "hub"}]),
                "start with",
            ),
            (
                serde_json::json!([{"name": "a", "path": "/d/{id}", "kind": "documents", "upstream": "hub"}]),
                "{collection}",
            ),
            (
                serde_json::json!([{"name": "a", "path": "/x", "upstream": "https://secure"}]),
                "http://",
            ),
            (
                serde_json::json!([{"name": "a", "path": "/x", "upstream": "not a url"}]),
                "upstream",
            ),
            (
                serde_json::json!([{"name": "a", "path": "/health", "kind": "websocket", "upstream": "hub"}]),
                "/health",
            ),
            (
                serde_json::json!([
                    {"name": "a", "path": "/x", "upstream": "hub"},
                    {"name": "b", "path": "/x", "kind": "websocket", "upstream": "hub"}
                ]),
                "\"b\"",
            ),
            // Found by the route_table fuzz target: axum panicked on these at start-up.
            (
                serde_json::json!([{"name": "a", "path": "/fi/*er{selst}", "upstream": "hub"}]),
                "starts with `:` or `*`",
            ),
            (
                serde_json::json!([{"name": "a", "path": "/users/:id", "upstream": "hub"}]),
                "starts with `:` or `*`",
            ),
        ];
        for (json, expected) in cases {
            let err = build(&specs(json.clone()), &commands, &hub).unwrap_err();
            assert!(err.to_string().contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let parsed: Result<Vec<RouteSpec>, _> = serde_json::from_value(serde_json::json!([
            {"name": "a", "path": "/x", "upstream": "hub", "timeout": 5}
        ]));
        assert!(parsed.is_err());
    }
}
