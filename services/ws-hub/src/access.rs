//! Who a connection is and what it may do: the token is found in the upgrade request,
//! verified with `common::auth`, and its claims become room permissions.
//!
//! - Token: `?token=<jwt>`, else `Authorization: Bearer <jwt>`, else a `bearer.<jwt>` entry
//!   of `Sec-WebSocket-Protocol` (browsers cannot set headers; list a real protocol too, such
//!   as `meridian.v1.json`, which is the one echoed).
//! - Subscribe: the token's grants allow the room ([`common::access`]: a `rooms` pattern
//!   matches it, or it is the room of a document or collection the `read` patterns cover).
//! - Publish: the room is subscribable AND matches `HUB_PUBLISH_ROOMS` (node-wide; empty by
//!   default, so rooms fed by the pipeline such as `doc:*` are never client-writable unless an
//!   operator says so).
//! - No token: allowed only when `HUB_ANONYMOUS_ROOMS` is set; such a connection may
//!   subscribe to those patterns and publish nowhere.

use axum::http::{HeaderMap, header};
use common::access::Grants;
pub use common::access::Patterns;
use common::auth::Claims;

use crate::protocol::BEARER_PROTOCOL_PREFIX;

/// One connection's identity and permissions.
#[derive(Debug, Clone)]
pub struct Access {
    /// The token's subject, or `anonymous`.
    pub subject: String,
    /// Rooms it may subscribe to.
    subscribe: Grants,
    /// Rooms it may publish to.
    publish: bool,
    /// When the token expires (seconds since the Unix epoch); the connection is closed then.
    pub expires_at: Option<i64>,
    /// Whether a token was verified (else the connection is anonymous).
    pub authenticated: bool,
}

impl Access {
    /// Permissions of a verified token (publishing still needs `HUB_PUBLISH_ROOMS`).
    pub fn from_claims(claims: &Claims) -> Self {
        Self {
            subject: claims.sub.clone(),
            subscribe: Grants::from_claims(claims),
            publish: true,
            expires_at: Some(claims.exp),
            authenticated: true,
        }
    }

    /// Permissions of a connection without a token.
    pub fn anonymous(rooms: &Patterns) -> Self {
        Self {
            subject: "anonymous".into(),
            subscribe: Grants::rooms_only(rooms.clone()),
            publish: false,
            expires_at: None,
            authenticated: false,
        }
    }

    /// Whether it may join `room`.
    pub fn can_subscribe(&self, room: &str) -> bool {
        self.subscribe.can_join(room)
    }

    /// Whether it may publish to `room`, given the node's publishable rooms.
    pub fn can_publish(&self, room: &str, publishable: &Patterns) -> bool {
        self.publish && self.can_subscribe(room) && publishable.matches(room)
    }
}

/// The access token of an upgrade request, from the query, `Authorization` or
/// `Sec-WebSocket-Protocol` (in that order).
pub fn token<'a>(query: Option<&'a str>, headers: &'a HeaderMap) -> Option<String> {
    if let Some(token) = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    }) {
        return Some(token);
    }
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    {
        return Some(token.trim().to_owned());
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(rooms: &[&str]) -> Claims {
        Claims {
            sub: "alice".into(),
            client_id: None,
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            read: vec!["books/*".into()],
            write: Vec::new(),
            exp: 0,
            iss: None,
        }
    }

    #[test]
    fn room_patterns_grant_subscribe_and_publish_needs_the_node_list_too() {
        let access = Access::from_claims(&claims(&["doc:orders:*", "chat:lobby"]));
        assert!(access.can_subscribe("doc:orders:42"));
        assert!(access.can_subscribe("chat:lobby"));
        assert!(!access.can_subscribe("doc:users:1"));
        // The `read` grant covers its documents' and collections' rooms.
        assert!(access.can_subscribe("doc:books:1"));
        assert!(access.can_subscribe("collection:books"));
        assert!(!access.can_publish("doc:books:1", &Patterns::new(&["chat:*"])));
        assert!(!access.can_publish("chat:lobby", &Patterns::default()));
        assert!(access.can_publish("chat:lobby", &Patterns::new(&["chat:*"])));
        assert!(!access.can_publish("doc:orders:42", &Patterns::new(&["chat:*"])));
    }

    #[test]
    fn anonymous_connections_never_publish() {
        let access = Access::anonymous(&Patterns::new(&["public:*"]));
        assert!(access.can_subscribe("public:news"));
        assert!(!access.can_publish("public:news", &Patterns::new(&["*"])));
    }

    #[test]
    fn the_token_is_taken_from_query_then_header_then_subprotocol() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "meridian.v1.json, bearer.from-protocol".parse().unwrap(),
        );
        assert_eq!(token(None, &headers).as_deref(), Some("from-protocol"));
        headers.insert(header::AUTHORIZATION, "Bearer from-header".parse().unwrap());
        assert_eq!(token(None, &headers).as_deref(), Some("from-header"));
        assert_eq!(
            token(Some("encoding=json&token=from%2Dquery"), &headers).as_deref(),
            Some("from-query")
        );
        assert_eq!(token(Some("encoding=json"), &HeaderMap::new()), None);
    }
}
