//! The names of a stack's external objects, derived from its (immutable) namespace and name
//! so they can never change under a running stack: the Kafka topics, the Redis ACL user and
//! the PostgreSQL role and database. Pure.
use crate::build::fingerprint;
use crate::validate::ValidatedStack;

/// The topics of every stack, without the prefix (ARCHITECTURE.md, "Kafka topics").
pub const TOPICS: [&str; 4] = ["commands", "events", "cache", "commands.dlq"];

/// PostgreSQL truncates identifiers to 63 bytes (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER: usize = 63;

/// The full name of one of the stack's topics: `<KAFKA_TOPIC_PREFIX><topic>`.
pub fn topic(stack: &ValidatedStack, topic: &str) -> String {
    format!("{}{topic}", stack.topic_prefix())
}

/// The stack's Redis ACL user: `meridian:<namespace>:<name>`.
pub fn redis_user(stack: &ValidatedStack) -> String {
    format!("meridian:{}:{}", stack.namespace(), stack.name())
}

/// The stack's PostgreSQL role, which is also the name of its database:
/// `mws_<namespace>_<name>` with `-` and `.` as `_`. Names longer than 63 bytes keep their
/// first 46 bytes and end in `_` and a 16-digit hash of the full name, so two stacks never
/// share a role.
pub fn postgres_role(stack: &ValidatedStack) -> String {
    let full: String = format!("mws_{}_{}", stack.namespace(), stack.name())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if full.len() <= MAX_IDENTIFIER {
        return full;
    }
    let hash = fingerprint([stack.namespace().as_bytes(), stack.name().as_bytes()]);
    format!("{}_{hash}", &full[..MAX_IDENTIFIER - 17])
}

/// The stack's own database (named like its role).
pub fn postgres_database(stack: &ValidatedStack) -> String {
    postgres_role(stack)
}

#[cfg(test)]
mod tests;
