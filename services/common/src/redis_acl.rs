//! What a stack's Redis ACL user may run: exactly the commands the services send, directly
//! and from their Lua scripts, on the stack's keys and channels only. The operator creates
//! each stack's user with [`rules`]; the services' integration suites run as such a user
//! (`test_support::stack_redis_url`), so a command added to a service without being listed
//! here fails its tests instead of production.
//!
//! Left out on purpose: every command that reaches beyond one key or channel — `SCAN`,
//! `KEYS`, `RANDOMKEY`, `DBSIZE`, `PUBSUB CHANNELS`, `INFO`, `CLIENT LIST`, … — because key and
//! channel patterns do not confine them, so they would show a stack other stacks' names.

/// The commands (lower case, `command|subcommand` for one subcommand), grouped by who sends
/// them.
pub const SERVICE_COMMANDS: &[&str] = &[
    // Connection set-up by redis-rs (AUTH is always allowed; the `CLIENT SETINFO` it also
    // sends is optional, its error ignored, and unknown before Redis 7.2) and health checks.
    "hello",
    "select",
    "ping",
    // Redis Cluster (`REDIS_CLUSTER`), by redis-rs's cluster client: the slot map on connect and
    // after a `MOVED` (`CLUSTER SLOTS` lists nodes and slot ranges, no key or channel), and
    // `ASKING` before following an `ASK` redirect while a slot migrates. (It sends `READONLY`
    // only to read from replicas, which the services do not.)
    "cluster|slots",
    "asking",
    // Scripts: redis-rs sends EVALSHA and loads a script the server does not know.
    "evalsha",
    "eval",
    "script|load",
    "script|exists",
    // Transactions: the cache updater applies a batch of events atomically.
    "multi",
    "exec",
    "discard",
    // The read model: reads (gateway), removals (rebuild).
    "hmget",
    "unlink",
    // Inside the scripts: the read model, rate limits, room history and epochs.
    "get",
    "set",
    "del",
    "expire",
    "pexpire",
    "persist",
    "hget",
    "hset",
    "hdel",
    "hincrby",
    "xadd",
    "xrange",
    "time",
    // Rooms across hub replicas.
    "publish",
    "subscribe",
    "unsubscribe",
    // Rooms on Redis Cluster: sharded channels (SPUBLISH from the room script).
    "spublish",
    "ssubscribe",
    "sunsubscribe",
];

/// The `ACL SETUSER` rules (after the user name, `on` and its passwords) that confine a
/// stack's user to the keys and channels starting with `prefix` and to
/// [`SERVICE_COMMANDS`]. Idempotent: every rule resets what it sets.
pub fn rules(prefix: &str) -> Vec<String> {
    let mut rules = vec![
        "resetkeys".to_owned(),
        format!("~{prefix}*"),
        "resetchannels".to_owned(),
        format!("&{prefix}*"),
        "-@all".to_owned(),
    ];
    rules.extend(SERVICE_COMMANDS.iter().map(|command| format!("+{command}")));
    rules
}
