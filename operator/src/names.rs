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

/// The stack's Kafka principal (a SCRAM user): `meridian:<namespace>:<name>`.
pub fn kafka_user(stack: &ValidatedStack) -> String {
    format!("meridian:{}:{}", stack.namespace(), stack.name())
}

/// The stack's second Kafka login, with the same ACLs: a rotation gives the login the services
/// do not use a new password and switches them to it, so pods still on the other keep working
/// until they have rolled (as for PostgreSQL).
pub fn kafka_second_user(stack: &ValidatedStack) -> String {
    format!("{}:b", kafka_user(stack))
}

/// The stack's PostgreSQL role, which is also the name of its database and owns it:
/// `mws_<namespace>_<name>` when both are plain `[a-z0-9]`. Otherwise `-` and `.` become `_`
/// and the name ends in `_` and a 16-digit hash of namespace and name, so stacks that differ
/// only there (`team-a/orders` and `team/a-orders`) never share a role; names longer than 63
/// bytes keep their first 46 bytes before the hash. A plain name has exactly two `_`, a hashed
/// one at least three or ends in the hash of its own full name.
pub fn postgres_role(stack: &ValidatedStack) -> String {
    let (namespace, name) = (stack.namespace(), stack.name());
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let full: String = format!("mws_{namespace}_{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if plain(namespace) && plain(name) && full.len() <= MAX_IDENTIFIER {
        return full;
    }
    with_hash(&full, [namespace.as_bytes(), name.as_bytes()])
}

/// The stack's second login role, `mwsr_…` (no primary role starts so): a member of the
/// [`postgres_role`] that acts as it (`SET role`), so whatever it creates belongs to the
/// primary role. Credential rotation alternates between the two logins: the new password goes
/// to the login the services do not use, and the old one stays valid until the next rotation,
/// so pods that have not rolled yet keep connecting.
pub fn postgres_second_login(stack: &ValidatedStack) -> String {
    let primary = postgres_role(stack);
    let full = format!("mwsr_{}", &primary["mws_".len()..]);
    if full.len() <= MAX_IDENTIFIER {
        return full;
    }
    with_hash(&full, [primary.as_bytes()])
}

/// `full` cut to 46 bytes (`[a-z0-9_]`, so any cut is a character boundary), `_` and the hash
/// of `parts`: 63 bytes at most.
fn with_hash<'a>(full: &str, parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let keep = full.len().min(MAX_IDENTIFIER - 17);
    format!("{}_{}", &full[..keep], fingerprint(parts))
}

/// The stack's own database (named like its role).
pub fn postgres_database(stack: &ValidatedStack) -> String {
    postgres_role(stack)
}

#[cfg(test)]
mod tests;
