//! The Redis read model: one HASH per document, written by the cache updater and read by the
//! gateway (ARCHITECTURE.md, "Redis").
//!
//! Key `<prefix>doc:<collection>:<id>`, fields:
//! - `version`: the document's version (decimal `i64`);
//! - `data`: the document's JSON text (absent on a tombstone);
//! - `updatedAt`: when the processor committed the change (RFC 3339);
//! - `deleted` = `1` on a tombstone, which expires after a TTL.
//!
//! Every write goes through one Lua script that compares the incoming version with the stored
//! one and applies the event only if it is newer ([`apply`]; the cache updater's
//! [`apply_and_publish_invocation`] also announces an applied event to its rooms in the same
//! script), so an event delivered late, twice or out of order can never move the projection
//! backwards. A delete leaves a tombstone that still carries the version for the TTL, so an
//! older event arriving after the delete cannot resurrect the document.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::envelope::EventEnvelope;

/// The infix between the stack's prefix and `<collection>:<id>`.
pub const DOC_KEY_INFIX: &str = "doc:";

/// How long a tombstone blocks older events when nothing else is configured.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `<prefix>doc:<collection>:<id>`: the read model's key of one document.
pub fn document_key(prefix: &str, collection: &str, id: &str) -> String {
    format!("{prefix}{DOC_KEY_INFIX}{collection}:{id}")
}

/// What the read model holds for one document.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The document at `version`.
    Found {
        /// The version of the projected state.
        version: i64,
        /// The document.
        data: serde_json::Value,
    },
    /// The document was deleted at `version` (a tombstone, kept for a TTL).
    Deleted {
        /// The version of the delete.
        version: i64,
    },
    /// Nothing is projected (never written, tombstone expired, or not replayed yet): ask the
    /// write model.
    Missing,
}

/// Reads one document from the read model.
///
/// A hash that cannot be interpreted (no parsable version, or data that is not JSON) is
/// reported as [`Lookup::Missing`] so the caller falls back to the write model instead of
/// serving garbage.
pub async fn read(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    collection: &str,
    id: &str,
) -> Result<Lookup, redis::RedisError> {
    Ok(read_with_time(conn, prefix, collection, id).await?.0)
}

/// [`read`], plus the projected state's `updatedAt` (RFC 3339, the event's `occurredAt`) when
/// the hash has one — what an HTTP answer needs to look like the write model's.
pub async fn read_with_time(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    collection: &str,
    id: &str,
) -> Result<(Lookup, Option<String>), redis::RedisError> {
    let (version, data, deleted, updated_at): (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ) = redis::cmd("HMGET")
        .arg(document_key(prefix, collection, id))
        .arg("version")
        .arg("data")
        .arg("deleted")
        .arg("updatedAt")
        .query_async(conn)
        .await?;
    Ok((interpret(version, data, deleted), updated_at))
}

fn interpret(version: Option<String>, data: Option<String>, deleted: Option<String>) -> Lookup {
    let Some(version) = version.and_then(|v| v.parse::<i64>().ok()) else {
        return Lookup::Missing;
    };
    if deleted.as_deref() == Some("1") {
        return Lookup::Deleted { version };
    }
    match data.map(|text| serde_json::from_str(&text)) {
        Some(Ok(data)) => Lookup::Found { version, data },
        _ => Lookup::Missing,
    }
}

/// What [`apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event was newer than the stored version and is now projected.
    Applied,
    /// The stored version was equal or newer (a redelivery, or an event overtaken by a later
    /// one); nothing changed.
    Stale,
}

/// Lua: `apply(key, version, data, updated_at, deleted, tombstone_ttl)`, the version-guarded
/// write: `data` is JSON text (empty for a delete), `deleted` is `1` for a delete else `0`,
/// `tombstone_ttl` in seconds. Returns 1 when applied, 0 when the stored version is equal or
/// newer.
///
/// Versions compare as Lua numbers (doubles): exact up to 2^53, far beyond any real count of
/// changes to one document.
const APPLY_LUA_FN: &str = r"
local function apply(key, version, data, updated_at, deleted, tombstone_ttl)
  local stored = redis.call('HGET', key, 'version')
  if stored and tonumber(stored) >= tonumber(version) then
    return 0
  end
  if deleted == '1' then
    redis.call('DEL', key)
    redis.call('HSET', key, 'version', version, 'updatedAt', updated_at, 'deleted', '1')
    redis.call('EXPIRE', key, tombstone_ttl)
  else
    redis.call('HSET', key, 'version', version, 'data', data, 'updatedAt', updated_at)
    redis.call('HDEL', key, 'deleted')
    redis.call('PERSIST', key)
  end
  return 1
end
";

/// `KEYS[1]` is the document key, `ARGV[1..=5]` the arguments of `apply` after the key.
const APPLY_LUA_MAIN: &str = r"
return apply(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
";

/// As [`APPLY_LUA_MAIN`], then, only if the event applied, `publish_room` for each room:
/// `ARGV[6..=10]` are the payload, history size, TTL (ms), publish time (µs) and traceparent,
/// then a channel and a candidate epoch per room; `KEYS[2..]` an epoch hash and a history stream per room (see
/// `Rooms::publication_args`).
const APPLY_AND_PUBLISH_LUA_MAIN: &str = r"
if apply(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]) == 0 then
  return 0
end
for room = 1, (#KEYS - 1) / 2 do
  publish_room(KEYS[2 * room], KEYS[2 * room + 1], ARGV[9 + 2 * room], ARGV[10 + 2 * room],
    ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[6])
end
return 1
";

/// On a cluster, where a document and its rooms live on different shards, the apply and the
/// announcements cannot be one script: [`APPLY_ANNOUNCING_LUA_MAIN`] applies and marks the
/// document with `announce` = the claim (`ARGV[6]`, the message's `<partition>:<offset>`), the
/// rooms are published to, then [`ANNOUNCED_LUA`] clears the mark. The same message
/// redelivered after a crash in between finds its own claim and is announced again (reply 2):
/// announcements are at least once, never lost for the latest version. Another message with
/// the same event (a duplicate) is stale, as on one Redis.
const APPLY_ANNOUNCING_LUA_MAIN: &str = r"
local stored = redis.call('HMGET', KEYS[1], 'version', 'announce')
if stored[1] and stored[1] == ARGV[1] and stored[2] then
  if stored[2] == ARGV[6] then
    return 2
  end
  return 0
end
if apply(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'announce', ARGV[6])
return 1
";

/// `KEYS[1]` a document, `ARGV[1]` a version, `ARGV[2]` a claim: clears the `announce` mark
/// if the document is still at that version under that claim (a newer one keeps its own).
const ANNOUNCED_LUA: &str = r"
local stored = redis.call('HMGET', KEYS[1], 'version', 'announce')
if stored[1] == ARGV[1] and stored[2] == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'announce')
end
return 0
";

static APPLY_ANNOUNCING: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{APPLY_LUA_FN}{APPLY_ANNOUNCING_LUA_MAIN}")));

static ANNOUNCED: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ANNOUNCED_LUA));

static APPLY: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{APPLY_LUA_FN}{APPLY_LUA_MAIN}")));

static APPLY_AND_PUBLISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{APPLY_LUA_FN}{}{APPLY_AND_PUBLISH_LUA_MAIN}",
        crate::rooms::PUBLISH_ROOM_LUA_FN
    ))
});

impl Outcome {
    /// Interprets the reply of [`apply_invocation`]'s script (1 when applied, else 0), or of
    /// [`apply_announcing_call`]'s (2: applied before, its announcement still due).
    pub fn from_reply(applied: i64) -> Self {
        if applied == 1 || applied == 2 {
            Self::Applied
        } else {
            Self::Stale
        }
    }
}

/// On a cluster, the first step of applying `event`, carried by the message `claim`
/// (`<partition>:<offset>`): [`apply_invocation`]'s, which also marks the document as to be
/// announced by that message; publish the applied ones to their rooms, then run
/// [`announced_call`]. Read its reply with [`Outcome::from_reply`].
pub fn apply_announcing_call(
    prefix: &str,
    event: &EventEnvelope,
    tombstone_ttl: Duration,
    claim: &str,
) -> crate::redis::ScriptCall<'static> {
    let script: &'static redis::Script = &APPLY_ANNOUNCING;
    let mut invocation = script.prepare_invoke();
    apply_args(&mut invocation, prefix, event, tombstone_ttl);
    invocation.arg(claim);
    crate::redis::ScriptCall {
        invocation,
        key: document_key(prefix, &event.collection, &event.id),
    }
}

/// The last step after [`apply_announcing_call`]: `event`, carried by `claim`, was announced
/// to its rooms.
pub fn announced_call(
    prefix: &str,
    event: &EventEnvelope,
    claim: &str,
) -> crate::redis::ScriptCall<'static> {
    let script: &'static redis::Script = &ANNOUNCED;
    let key = document_key(prefix, &event.collection, &event.id);
    let mut invocation = script.prepare_invoke();
    invocation.key(&key).arg(event.version).arg(claim);
    crate::redis::ScriptCall { invocation, key }
}

/// Projects `event` unless the read model already holds its version or a newer one.
///
/// One atomic script (EVALSHA, with a transparent EVAL fallback after `NOSCRIPT`). A delete
/// event replaces the document with a tombstone that expires after `tombstone_ttl`.
pub async fn apply(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    event: &EventEnvelope,
    tombstone_ttl: Duration,
) -> Result<Outcome, redis::RedisError> {
    let applied: i64 = apply_invocation(prefix, event, tombstone_ttl)
        .invoke_async(conn)
        .await?;
    Ok(Outcome::from_reply(applied))
}

/// The script call of [`apply`], for callers that pipeline many of them (Redis runs a
/// pipeline's commands in order, so one document's events still apply in order). Read its
/// reply with [`Outcome::from_reply`]. In a pipeline a script is not loaded automatically:
/// the caller handles `NOSCRIPT` (for example with [`redis::ScriptInvocation::load_async`]).
pub fn apply_invocation(
    prefix: &str,
    event: &EventEnvelope,
    tombstone_ttl: Duration,
) -> redis::ScriptInvocation<'static> {
    let script: &'static redis::Script = &APPLY;
    let mut invocation = script.prepare_invoke();
    apply_args(&mut invocation, prefix, event, tombstone_ttl);
    invocation
}

/// [`apply_invocation`] that, when the event applies, also publishes `payload` to each of
/// `rooms` ([`Rooms::publish`](crate::rooms::Rooms::publish)'s steps), all in one atomic
/// script: an applied event is always announced, a stale one never is, and the read model,
/// the rooms' histories and their channels never disagree. The publications carry
/// `trace_parent` (the event's span) so the hub's fan-out continues the event's trace. Its
/// reply is the same as [`apply_invocation`]'s.
pub fn apply_and_publish_invocation<R: AsRef<str>>(
    prefix: &str,
    event: &EventEnvelope,
    tombstone_ttl: Duration,
    rooms: &crate::rooms::Rooms,
    room_names: &[R],
    payload: &[u8],
    trace_parent: Option<&str>,
) -> redis::ScriptInvocation<'static> {
    let script: &'static redis::Script = &APPLY_AND_PUBLISH;
    let mut invocation = script.prepare_invoke();
    apply_args(&mut invocation, prefix, event, tombstone_ttl);
    rooms.publication_args(&mut invocation, room_names, payload, trace_parent);
    invocation
}

/// The document key and the five arguments of the Lua `apply`.
fn apply_args(
    invocation: &mut redis::ScriptInvocation<'_>,
    prefix: &str,
    event: &EventEnvelope,
    tombstone_ttl: Duration,
) {
    let deleted = event.is_delete();
    let data = match (&event.data, deleted) {
        (Some(data), false) => data.to_string(),
        // A non-delete event without data projects a JSON null, like the write model.
        (None, false) => "null".to_owned(),
        (_, true) => String::new(),
    };
    invocation
        .key(document_key(prefix, &event.collection, &event.id))
        .arg(event.version)
        .arg(data)
        .arg(rfc3339(event.occurred_at))
        .arg(if deleted { "1" } else { "0" })
        .arg(tombstone_ttl.as_secs().max(1));
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Removes the named documents (`(collection, id)`) from the stack's read model with one
/// `UNLINK`, which frees their memory off Redis's main thread. Returns how many existed.
///
/// The stack's keys are never enumerated (`SCAN` is not confined to a key prefix, so a
/// stack's Redis user may not run it): the caller names the documents, e.g. from the events
/// that mention them (`cache-updater rebuild`).
pub async fn unlink<'a>(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    documents: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<u64, redis::RedisError> {
    let keys: Vec<String> = documents
        .into_iter()
        .map(|(collection, id)| document_key(prefix, collection, id))
        .collect();
    if keys.is_empty() {
        return Ok(0);
    }
    redis::cmd("UNLINK").arg(&keys).query_async(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_keys_follow_the_documented_layout() {
        assert_eq!(
            document_key("meridian:ns:s:", "books", "b1"),
            "meridian:ns:s:doc:books:b1"
        );
    }

    #[test]
    fn a_hash_is_interpreted_as_found_deleted_or_missing() {
        assert_eq!(
            interpret(Some("3".into()), Some(r#"{"a":1}"#.into()), None),
            Lookup::Found {
                version: 3,
                data: serde_json::json!({"a": 1})
            }
        );
        assert_eq!(
            interpret(Some("4".into()), None, Some("1".into())),
            Lookup::Deleted { version: 4 }
        );
        assert_eq!(interpret(None, None, None), Lookup::Missing);
        assert_eq!(
            interpret(Some("x".into()), Some("{}".into()), None),
            Lookup::Missing
        );
        assert_eq!(
            interpret(Some("1".into()), Some("not json".into()), None),
            Lookup::Missing
        );
    }
}
