//! What a verified token allows: one model shared by the gateway (document reads), the
//! command service (commands, their status, write-model reads) and the hub (rooms).
//!
//! A token's claims carry patterns (`*` any run of characters, `?` one character, matched
//! with [`wildmatch`]):
//!
//! ```json
//! {"sub": "alice",
//!  "read":  ["orders/*", "profiles/alice"],
//!  "write": ["orders/*"],
//!  "rooms": ["chat:lobby"]}
//! ```
//!
//! - `read`: the documents (`<collection>/<id>`) the subject may read — `GET
//!   /v1/documents/{collection}/{id}` and the hub's `doc:<collection>:<id>` room. A pattern
//!   ending in `/*` whose collection part matches `C` (or the pattern `*`) also grants the
//!   `collection:C` room, which carries every document of `C`.
//! - `write`: the documents the subject may send commands for (any command type).
//! - `rooms`: further hub rooms the subject may join (`cmd:*`, application rooms).
//!
//! Nothing is granted by default: a token without `read` reads nothing. The status of a
//! command is visible to the subject who sent it only. Collection and document ids never
//! contain `/` or `:` (the command service refuses such names), so `<collection>/<id>` and
//! the room names are unambiguous.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use wildmatch::WildMatch;

use crate::auth::Claims;
use crate::metrics::ACCESS_DENIED_TOTAL;
use crate::problem::{Problem, ProblemType};

/// Compiled patterns.
#[derive(Debug, Clone, Default)]
pub struct Patterns(Vec<WildMatch>);

impl Patterns {
    /// Compiles `patterns` (blank entries are ignored).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self(
            patterns
                .iter()
                .map(AsRef::as_ref)
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(WildMatch::new)
                .collect(),
        )
    }

    /// Whether any pattern matches `text`.
    pub fn matches(&self, text: &str) -> bool {
        self.0.iter().any(|p| p.matches(text))
    }

    /// Whether there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one token allows.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    read: Patterns,
    /// The `read` patterns of the form `<collection pattern>/*`, as collection patterns,
    /// plus `*` for a `*` read pattern: the collections readable as a whole.
    read_collections: Patterns,
    write: Patterns,
    rooms: Patterns,
}

impl Grants {
    /// The grants of a verified token.
    pub fn from_claims(claims: &Claims) -> Self {
        let collections: Vec<&str> = claims
            .read
            .iter()
            .map(|p| p.trim())
            .filter_map(|p| {
                if p == "*" {
                    Some("*")
                } else {
                    p.strip_suffix("/*")
                }
            })
            .collect();
        Self {
            read: Patterns::new(&claims.read),
            read_collections: Patterns::new(&collections),
            write: Patterns::new(&claims.write),
            rooms: Patterns::new(&claims.rooms),
        }
    }

    /// Only rooms (a connection without a token may join `rooms`).
    pub fn rooms_only(rooms: Patterns) -> Self {
        Self {
            rooms,
            ..Self::default()
        }
    }

    /// Whether the document `collection`/`id` may be read.
    pub fn can_read(&self, collection: &str, id: &str) -> bool {
        self.read.matches(&document(collection, id))
    }

    /// Whether commands for the document `collection`/`id` may be sent.
    pub fn can_write(&self, collection: &str, id: &str) -> bool {
        self.write.matches(&document(collection, id))
    }

    /// Whether the hub room `room` may be joined: a `rooms` pattern matches it, or it is a
    /// document's or a collection's room the `read` patterns cover.
    pub fn can_join(&self, room: &str) -> bool {
        if self.rooms.matches(room) {
            return true;
        }
        if let Some(rest) = room.strip_prefix("doc:") {
            return rest
                .split_once(':')
                .is_some_and(|(collection, id)| self.can_read(collection, id));
        }
        room.strip_prefix("collection:")
            .is_some_and(|collection| self.read_collections.matches(collection))
    }
}

/// What a request wanted to do, for [`denied`] (the metric's `action` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read a document.
    Read,
    /// Send a command for a document.
    Write,
}

impl Action {
    /// The claim that grants it (`read`, `write`), also the metric's `action` label.
    pub fn claim(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// The 403 `forbidden` problem for `action` on `collection`/`id`, counted in
/// `access_denied_total`.
pub fn denied(service: &'static str, action: Action, collection: &str, id: &str) -> Response {
    metrics::counter!(ACCESS_DENIED_TOTAL, "service" => service, "action" => action.claim())
        .increment(1);
    Problem::new(ProblemType::Forbidden, StatusCode::FORBIDDEN)
        .detail(format!(
            "the token's `{}` claim does not cover {collection}/{id}",
            action.claim()
        ))
        .into_response()
}

/// `<collection>/<id>`, the text `read` and `write` patterns are matched against.
fn document(collection: &str, id: &str) -> String {
    let mut text = String::with_capacity(collection.len() + 1 + id.len());
    text.push_str(collection);
    text.push('/');
    text.push_str(id);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(read: &[&str], write: &[&str], rooms: &[&str]) -> Claims {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Claims {
            sub: "alice".into(),
            client_id: None,
            rooms: owned(rooms),
            read: owned(read),
            write: owned(write),
            exp: 0,
            iss: None,
        }
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let grants = Grants::from_claims(&claims(&[], &[], &[]));
        assert!(!grants.can_read("orders", "1"));
        assert!(!grants.can_write("orders", "1"));
        assert!(!grants.can_join("doc:orders:1"));
        assert!(!grants.can_join("collection:orders"));
        assert!(!grants.can_join("cmd:x"));
    }

    #[test]
    fn read_and_write_are_separate_grants_on_documents() {
        let grants = Grants::from_claims(&claims(
            &["orders/*", "profiles/alice"],
            &["orders/a-?"],
            &[],
        ));
        assert!(grants.can_read("orders", "42"));
        assert!(grants.can_read("profiles", "alice"));
        assert!(!grants.can_read("profiles", "bob"));
        assert!(!grants.can_read("ordersx", "1"));
        assert!(grants.can_write("orders", "a-1"));
        assert!(!grants.can_write("orders", "a-12"));
        assert!(!grants.can_write("profiles", "alice"));
    }

    #[test]
    fn read_grants_cover_the_document_and_collection_rooms() {
        let grants = Grants::from_claims(&claims(
            &["orders/*", "profiles/alice", "carts-*/*"],
            &[],
            &["chat:*"],
        ));
        assert!(grants.can_join("doc:orders:42"));
        assert!(grants.can_join("doc:profiles:alice"));
        assert!(!grants.can_join("doc:profiles:bob"));
        assert!(grants.can_join("collection:orders"));
        assert!(grants.can_join("collection:carts-eu"));
        // One document of a collection does not grant the whole collection.
        assert!(!grants.can_join("collection:profiles"));
        assert!(grants.can_join("chat:lobby"));
        assert!(!grants.can_join("cmd:123"));
        assert!(!grants.can_join("doc:orders"));

        let everything = Grants::from_claims(&claims(&["*"], &[], &[]));
        assert!(everything.can_join("collection:anything"));
        assert!(everything.can_join("doc:a:b"));
        assert!(!everything.can_join("chat:lobby"));
    }

    #[test]
    fn rooms_only_grants_join_nothing_else() {
        let grants = Grants::rooms_only(Patterns::new(&["public:*", " "]));
        assert!(grants.can_join("public:news"));
        assert!(!grants.can_read("public", "news"));
        assert!(!grants.can_join("doc:public:news"));
    }
}
