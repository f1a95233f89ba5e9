//! Rooms: the WebSocket hub's unit of fan-out, shared by everything that publishes to clients
//! (the cache updater, the hub itself) and by the hub, which delivers and resumes.
//!
//! Per room, below the stack's `REDIS_KEY_PREFIX`:
//! - `epoch:<room>`: a HASH `{epoch, offset}`; `epoch` is a random id created when the room
//!   has none, `offset` the last offset handed out (a `u64` that grows by one per publication).
//! - `history:<room>`: a STREAM of the last [`HistorySettings::size`] publications; each entry's
//!   id is `<offset>-0`, so "everything after offset N" is one `XRANGE`.
//! - `room:<room>`: the pub/sub channel; each message is a [`Publication`] frame
//!   (see [`Publication::encode`]).
//!
//! On Redis Cluster (`REDIS_CLUSTER`) the room's name is the hash tag of all three
//! (`epoch:{<room>}`, `history:{<room>}`, `room:{<room>}`), so one room's scripts run on one
//! shard and rooms spread over the shards; the channel is a sharded one (`SPUBLISH`,
//! `SSUBSCRIBE`), delivered by the shard that owns it instead of by every node.
//!
//! Both keys expire [`HistorySettings::ttl`] after the last publication; when they are gone,
//! the next publication starts a new epoch (offsets restart at 1) and a client resuming with
//! the old epoch is told it cannot be recovered.
//!
//! Publishing is one atomic Lua script (ensure the epoch, bump the offset, `XADD` with an exact
//! `MAXLEN`, refresh the TTLs, `PUBLISH`), so the history and the channel never disagree on
//! an offset; the cache updater runs the same steps inside its read-model script
//! ([`crate::readmodel::apply_and_publish_invocation`]), so an applied event and its
//! announcements are one atomic step too. Reading ([`Rooms::recover`], [`Rooms::position`])
//! is another script, so the current position and the history it returns are one consistent
//! snapshot.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use redis::Script;

use std::sync::LazyLock;

use crate::redis::{Redis, RedisError, ScriptCall};

/// How much history each room keeps for resuming clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    /// Publications kept per room (the stream's exact `MAXLEN`). At least 1.
    pub size: usize,
    /// How long a room's history and epoch live after its last publication.
    pub ttl: Duration,
}

impl Default for HistorySettings {
    /// 100 publications for 5 minutes (the hub's `HUB_HISTORY_SIZE` and
    /// `HUB_HISTORY_TTL_SECONDS` defaults).
    fn default() -> Self {
        Self {
            size: 100,
            ttl: Duration::from_secs(300),
        }
    }
}

/// Where a room's stream of publications stands: its epoch and an offset within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The room's current epoch (changes when the room's history was lost).
    pub epoch: String,
    /// An offset within the epoch; publications are numbered from 1.
    pub offset: u64,
}

/// One publication to a room, as carried on the room's channel and kept in its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The room's epoch when it was published.
    pub epoch: String,
    /// Its offset within the epoch.
    pub offset: u64,
    /// The W3C `traceparent` of the publisher's span, when it had one: the hub's fan-out span
    /// continues that trace.
    pub trace_parent: Option<String>,
    /// When the publisher sent it, in microseconds since the Unix epoch (publisher's clock;
    /// used for the publish → deliver latency metric).
    pub published_at_micros: u64,
    /// The payload, byte for byte as published.
    pub payload: Bytes,
}

/// What [`Rooms::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The room's position now (the last publication's offset, 0 before the first one).
    pub position: Position,
    /// The publications after the requested offset, oldest first, or `None` when they
    /// cannot all be returned (the epoch changed, or some were trimmed from the history).
    pub publications: Option<Vec<Publication>>,
}

/// A rooms operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RoomsError {
    /// Redis was unreachable or a command failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// A frame on a room channel or a history entry was not in the expected format.
    #[error("failed to decode a room frame: {0}")]
    Malformed(&'static str),
}

impl From<redis::RedisError> for RoomsError {
    fn from(error: redis::RedisError) -> Self {
        Self::Redis(RedisError::Command(error))
    }
}

/// Marks the start of a publication frame, so the format can evolve.
const FRAME_MAGIC: &[u8] = b"m1 ";

/// Lua: `publish_room(epoch_key, history_key, channel, candidate_epoch, history_size, ttl_ms,
/// published_at_micros, traceparent, payload)` returns `epoch, offset`: the steps of one
/// publication (ensure the epoch, bump the offset, `XADD` with an exact `MAXLEN`, refresh the
/// TTLs, `PUBLISH`); an empty `traceparent` is left out of the entry and the frame. The
/// one definition for every script that publishes: [`Rooms::publish`]'s and
/// [`crate::readmodel::apply_and_publish_invocation`]'s.
pub(crate) const PUBLISH_ROOM_LUA_FN: &str = r"
local function publish_room(epoch_key, history_key, channel, candidate, size, ttl, micros, tp, payload)
  local epoch = redis.call('HGET', epoch_key, 'epoch')
  if not epoch then
    epoch = candidate
    redis.call('DEL', history_key)
    redis.call('HSET', epoch_key, 'epoch', epoch, 'offset', 0)
  end
  local offset = redis.call('HINCRBY', epoch_key, 'offset', 1)
  local header = 'm1 ' .. epoch .. ' ' .. offset .. ' ' .. micros
  if tp == '' then
    redis.call('XADD', history_key, 'MAXLEN', '=', size, offset .. '-0', 't', micros, 'p', payload)
  else
    redis.call('XADD', history_key, 'MAXLEN', '=', size, offset .. '-0', 't', micros, 'c', tp, 'p', payload)
    header = header .. ' ' .. tp
  end
  redis.call('PEXPIRE', epoch_key, ttl)
  redis.call('PEXPIRE', history_key, ttl)
  redis.call('PUBLISH', channel, header .. '\n' .. payload)
  return epoch, offset
end
";

/// One room, arguments as [`Rooms::publication_args`] lays them out. Returns `{epoch, offset}`.
const PUBLISH_LUA_MAIN: &str = r"
local epoch, offset = publish_room(KEYS[1], KEYS[2], ARGV[6], ARGV[7], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[1])
return {epoch, offset}
";

/// KEYS: epoch hash, history stream. ARGV: candidate epoch, TTL (ms), client epoch (or ''),
/// client offset. Returns `{epoch, offset, recoverable (0/1), entries}`; entries are only
/// read when the client's epoch matches and nothing after its offset was trimmed.
const RECOVER_LUA: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  top = tonumber(redis.call('HGET', KEYS[1], 'offset'))
end
if ARGV[3] ~= epoch then
  return {epoch, top, 0, {}}
end
local since = tonumber(ARGV[4])
if since > top then
  return {epoch, top, 0, {}}
end
if since == top then
  return {epoch, top, 1, {}}
end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #first == 0 then
  return {epoch, top, 0, {}}
end
local oldest = tonumber(string.match(first[1][1], '^(%d+)'))
if oldest > since + 1 then
  return {epoch, top, 0, {}}
end
return {epoch, top, 1, redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')}
";

/// Publishes to and reads from rooms. Cheap to clone.
#[derive(Clone)]
pub struct Rooms {
    redis: Redis,
    settings: HistorySettings,
    publish: &'static Script,
    recover: Script,
}

/// The publish script, on one Redis and on a cluster.
static PUBLISH: LazyLock<[Script; 2]> = LazyLock::new(|| {
    [false, true].map(|cluster| {
        Script::new(&format!(
            "{}{PUBLISH_LUA_MAIN}",
            publish_room_lua_fn(cluster)
        ))
    })
});

/// [`PUBLISH_ROOM_LUA_FN`] as a cluster runs it: `SPUBLISH` to the room's sharded channel.
pub(crate) fn publish_room_lua_fn(cluster: bool) -> String {
    if cluster {
        PUBLISH_ROOM_LUA_FN.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
    } else {
        PUBLISH_ROOM_LUA_FN.to_owned()
    }
}

impl Rooms {
    /// Rooms on `redis` (keys under its prefix) with `settings` for the history.
    pub fn new(redis: Redis, settings: HistorySettings) -> Self {
        let publish = &PUBLISH[usize::from(redis.is_cluster())];
        Self {
            redis,
            settings,
            publish,
            recover: Script::new(RECOVER_LUA),
        }
    }

    /// Whether room channels are sharded ones (`SSUBSCRIBE`): on Redis Cluster.
    pub fn sharded(&self) -> bool {
        self.redis.is_cluster()
    }

    /// The history settings.
    pub fn settings(&self) -> HistorySettings {
        self.settings
    }

    /// The pub/sub channel of `room` (`<prefix>room:<room>`; `<prefix>room:{<room>}` on a
    /// cluster).
    pub fn channel(&self, room: &str) -> String {
        self.redis.tagged("room:", room)
    }

    /// The room a channel name belongs to, if it is one of this stack's room channels.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let prefix = self.redis.key("room:");
        let room = channel.strip_prefix(prefix.as_str())?;
        if self.redis.is_cluster() {
            room.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(room)
        }
    }

    fn epoch_key(&self, room: &str) -> String {
        self.redis.tagged("epoch:", room)
    }

    fn history_key(&self, room: &str) -> String {
        self.redis.tagged("history:", room)
    }

    fn ttl_millis(&self) -> u64 {
        u64::try_from(self.settings.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Appends `payload` to the room's history and publishes it to the room's channel, in one
    /// atomic step; returns the position it was given. The publication carries the current
    /// span's trace context.
    pub async fn publish(&self, room: &str, payload: &[u8]) -> Result<Position, RoomsError> {
        let mut conn = self.redis.connection()?;
        let trace_parent = crate::telemetry::traceparent_of(&tracing::Span::current());
        let call = self.publish_call(room, payload, trace_parent.as_deref());
        let (epoch, offset): (String, u64) = call.invocation.invoke_async(&mut conn).await?;
        Ok(Position { epoch, offset })
    }

    /// The script call of [`Rooms::publish`], for callers that run many at once
    /// ([`crate::redis::run_scripts`]); its reply is `{epoch, offset}`.
    pub fn publish_call(
        &self,
        room: &str,
        payload: &[u8],
        trace_parent: Option<&str>,
    ) -> ScriptCall<'static> {
        let mut invocation = self.publish.prepare_invoke();
        self.publication_args(&mut invocation, &[room], payload, trace_parent);
        ScriptCall {
            invocation,
            key: self.epoch_key(room),
        }
    }

    /// Adds the arguments of a script built on [`PUBLISH_ROOM_LUA_FN`] that publishes
    /// `payload` to each of `rooms`: ARGV gets the payload, the history size, the TTL (ms), the
    /// publish time (µs) and the `traceparent` (empty for none), then a channel and a candidate
    /// epoch per room; KEYS gets each room's epoch hash and history stream. Call it after the
    /// script's own KEYS and ARGV.
    pub(crate) fn publication_args<R: AsRef<str>>(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        rooms: &[R],
        payload: &[u8],
        trace_parent: Option<&str>,
    ) {
        // A header field: anything but a W3C traceparent's characters is dropped, not sent.
        let trace_parent = trace_parent
            .filter(|tp| tp.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            .unwrap_or("");
        invocation
            .arg(payload)
            .arg(self.settings.size.max(1))
            .arg(self.ttl_millis())
            .arg(now_micros())
            .arg(trace_parent);
        for room in rooms {
            let room = room.as_ref();
            invocation
                .key(self.epoch_key(room))
                .key(self.history_key(room))
                .arg(self.channel(room))
                .arg(new_epoch());
        }
    }

    /// The room's current position (creating its epoch if it has none yet).
    pub async fn position(&self, room: &str) -> Result<Position, RoomsError> {
        Ok(self.recover_inner(room, None).await?.position)
    }

    /// The room's current position and the publications after `since`, if they can all be
    /// returned (same epoch, none trimmed). Creates the room's epoch if it has none yet.
    pub async fn recover(&self, room: &str, since: &Position) -> Result<Recovery, RoomsError> {
        self.recover_inner(room, Some(since)).await
    }

    async fn recover_inner(
        &self,
        room: &str,
        since: Option<&Position>,
    ) -> Result<Recovery, RoomsError> {
        type Entry = (String, Vec<(String, Vec<u8>)>);
        let mut conn = self.redis.connection()?;
        let (epoch, offset, recoverable, entries): (String, u64, u8, Vec<Entry>) = self
            .recover
            .key(self.epoch_key(room))
            .key(self.history_key(room))
            .arg(new_epoch())
            .arg(self.ttl_millis())
            .arg(since.map_or("", |s| s.epoch.as_str()))
            .arg(since.map_or(0, |s| s.offset))
            .invoke_async(&mut conn)
            .await?;
        let publications = if since.is_some() && recoverable == 1 {
            let mut list = Vec::with_capacity(entries.len());
            for (id, fields) in entries {
                list.push(history_entry(&epoch, &id, fields)?);
            }
            Some(list)
        } else {
            None
        };
        Ok(Recovery {
            position: Position { epoch, offset },
            publications,
        })
    }
}

fn history_entry(
    epoch: &str,
    id: &str,
    fields: Vec<(String, Vec<u8>)>,
) -> Result<Publication, RoomsError> {
    let offset = id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .ok_or(RoomsError::Malformed("history entry id"))?;
    let (mut published_at_micros, mut payload, mut trace_parent) = (0, None, None);
    for (name, value) in fields {
        match name.as_str() {
            "t" => {
                published_at_micros = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or(RoomsError::Malformed("history entry time"))?;
            }
            "p" => payload = Some(Bytes::from(value)),
            "c" => trace_parent = String::from_utf8(value).ok(),
            _ => {}
        }
    }
    Ok(Publication {
        epoch: epoch.to_owned(),
        offset,
        trace_parent,
        published_at_micros,
        payload: payload.ok_or(RoomsError::Malformed("history entry without payload"))?,
    })
}

impl Publication {
    /// The channel frame: `m1 <epoch> <offset> <published_at_micros>[ <traceparent>]\n<payload
    /// bytes>` (a short ASCII header, then the payload untouched). The publish script builds
    /// the same bytes inside Redis.
    pub fn encode(&self) -> Vec<u8> {
        let mut header = format!(
            "m1 {} {} {}",
            self.epoch, self.offset, self.published_at_micros
        );
        if let Some(tp) = &self.trace_parent {
            header.push(' ');
            header.push_str(tp);
        }
        header.push('\n');
        let mut frame = Vec::with_capacity(header.len() + self.payload.len());
        frame.extend_from_slice(header.as_bytes());
        frame.extend_from_slice(&self.payload);
        frame
    }

    /// Parses a channel frame (see [`Publication::encode`]); the payload shares `frame`'s
    /// buffer.
    pub fn decode(frame: Bytes) -> Result<Self, RoomsError> {
        let rest = frame
            .strip_prefix(FRAME_MAGIC)
            .ok_or(RoomsError::Malformed("missing frame marker"))?;
        let newline = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(RoomsError::Malformed("missing header end"))?;
        let header = std::str::from_utf8(&rest[..newline])
            .map_err(|_| RoomsError::Malformed("header is not UTF-8"))?;
        let mut fields = header.split(' ');
        let (Some(epoch), Some(offset), Some(at), trace_parent, None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(RoomsError::Malformed(
                "header needs epoch, offset, time and at most a traceparent",
            ));
        };
        let offset = offset
            .parse()
            .map_err(|_| RoomsError::Malformed("offset is not a number"))?;
        let published_at_micros = at
            .parse()
            .map_err(|_| RoomsError::Malformed("time is not a number"))?;
        let start = FRAME_MAGIC.len() + newline + 1;
        Ok(Self {
            epoch: epoch.to_owned(),
            offset,
            trace_parent: trace_parent.map(str::to_owned),
            published_at_micros,
            payload: frame.slice(start..),
        })
    }
}

/// A fresh random epoch id (used only when the room has none).
fn new_epoch() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(16);
    id
}

/// Now, in microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_with_a_binary_payload() {
        for trace_parent in [
            None,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
        ] {
            let publication = Publication {
                epoch: "abc123".into(),
                offset: 42,
                trace_parent,
                published_at_micros: 1_700_000_000_000_000,
                payload: Bytes::from_static(&[0xff, 0x00, b'\n', 0xc3, 0x28]),
            };
            let decoded = Publication::decode(Bytes::from(publication.encode())).unwrap();
            assert_eq!(decoded, publication);
        }
    }

    #[test]
    fn a_frame_without_the_marker_or_a_complete_header_is_refused() {
        for frame in [
            &b"hello"[..],
            b"m1 e 1\npayload",
            b"m1 e x 1\n",
            b"m1 e 1 2",
            b"m1 e 1 2 00-ab-cd-01 extra\npayload",
        ] {
            assert!(
                Publication::decode(Bytes::copy_from_slice(frame)).is_err(),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn new_epochs_differ() {
        assert_ne!(new_epoch(), new_epoch());
    }
}
