//! Distributed rate limiting shared by every gateway replica through Redis.
//!
//! Each policy is a GCRA (generic cell rate algorithm) bucket: `rate` requests per `period`,
//! at most `burst` at once, refilled continuously, so there is no fixed-window double burst
//! at a boundary. All the policies that apply to one request are checked by ONE Lua script
//! call (`EVALSHA`, loaded on `NOSCRIPT`): it reads the server clock (`TIME`, so replicas
//! with skewed clocks agree), decides, and only when every policy allows it stores the new
//! theoretical arrival times — all or nothing, atomically, in one round trip.
//!
//! Keys: `<REDIS_KEY_PREFIX>rl:<policy>:<subject>`, expiring once the bucket is full again.
//! A key that Redis reported as over its limit is remembered locally until its retry time
//! (a GCRA deadline only moves forward, so a local denial never refuses anything Redis would
//! allow). Redis errors and timeouts (`GATEWAY_RATE_LIMIT_TIMEOUT_MS`) fail open (allow, the
//! default) or closed (503), per `GATEWAY_RATE_LIMIT_FAIL_MODE`.
//!
//! Responses carry the IETF `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers), serialised as RFC 9651 structured fields by `sfv`:
//! `RateLimit-Policy: "per-user";q=100;w=2` and `RateLimit: "per-user";r=42;t=2`. A GCRA
//! bucket has no fixed window, so the policy is advertised as the window the bucket takes to
//! refill: `q` = `burst` (what may be sent at once), `w` = the seconds `burst` requests take
//! at the sustained rate, rounded up (rate 50/s with burst 100 is `q=100;w=2`). So `r`
//! (requests possible right now) never exceeds `q`, `t` (seconds until the bucket is full
//! again, when `r` is back to `q`) never exceeds `w`, and a client that keeps to `q` per `w`
//! is never refused (rounding `w` up only makes it stricter than the sustained rate).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use common::metrics::GATEWAY_RATE_LIMIT_DECISIONS_TOTAL;
use common::redis::Redis;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Subjects longer than this (an anonymous caller's `X-Client-Id`) are not rate-limit keys.
const MAX_SUBJECT_LEN: usize = 255;
/// Entries in the local cache of keys known to be over their limit.
const DENIED_CACHE_CAPACITY: usize = 10_000;

/// The GCRA check over every policy of one request. KEYS: the buckets. ARGV: per key, the
/// emission interval and the burst, in that order. Returns `{allowed, then per key:
/// remaining, µs until full, µs until retry}`.
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats = {}
local allowed = 1
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local stored = redis.call('GET', KEYS[i])
  local tat = stored and tonumber(stored) or now
  if tat < now then tat = now end
  tats[i] = tat
  if tat + interval - interval * burst > now then allowed = 0 end
end
local out = {allowed}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tats[i]
  local retry = 0
  if allowed == 1 then
    tat = tat + interval
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
  else
    local allow_at = tat + interval - interval * burst
    if allow_at > now then retry = allow_at - now end
  end
  local remaining = math.floor((now + interval * burst - tat) / interval)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = tat - now
  out[#out + 1] = retry
end
return out
",
    )
});

/// What a policy counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// The JWT subject (anonymous requests are not counted by these policies).
    User,
    /// The JWT `client_id`/`azp`, or an anonymous caller's `X-Client-Id`.
    Client,
    /// The client address (see `GATEWAY_TRUSTED_PROXY_HOPS`).
    Ip,
    /// The route: one budget shared by every caller of it.
    Route,
}

/// The period `rate` is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Period {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
}

impl Period {
    /// The period in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
        }
    }
}

/// One policy, as configured in `GATEWAY_RATE_LIMITS`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Policy name: `[a-z0-9_-]+`, unique; part of the Redis key and the headers.
    pub name: String,
    /// What the policy counts per.
    pub key: KeyKind,
    /// Requests per period (sustained).
    pub rate: u64,
    /// The period.
    pub period: Period,
    /// Requests allowed at once. Default: `rate`.
    #[serde(default)]
    pub burst: Option<u64>,
    /// Route names the policy applies to. Default: every route.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    spec: PolicySpec,
    burst: u64,
    /// Microseconds between two requests at the sustained rate.
    interval_us: u64,
}

impl Policy {
    /// Validates one policy.
    pub fn new(spec: PolicySpec) -> Result<Self, String> {
        if spec.name.is_empty()
            || !spec
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
        {
            return Err(format!(
                "rate-limit policy {:?}: the name must be 1+ characters of [a-z0-9_-]",
                spec.name
            ));
        }
        if spec.rate == 0 || spec.burst == Some(0) {
            return Err(format!(
                "rate-limit policy {:?}: rate and burst must be at least 1",
                spec.name
            ));
        }
        let period_us = spec.period.seconds() * 1_000_000;
        if spec.rate > period_us {
            return Err(format!(
                "rate-limit policy {:?}: at most one request per microsecond",
                spec.name
            ));
        }
        Ok(Self {
            burst: spec.burst.unwrap_or(spec.rate),
            interval_us: period_us / spec.rate,
            spec,
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// `(q, w)` of `RateLimit-Policy`: the burst, and the whole seconds (at least one) the
    /// burst takes at the sustained rate (see the module documentation).
    fn advertised(&self) -> (u64, u64) {
        let refill_us = u128::from(self.burst) * u128::from(self.spec.period.seconds()) * 1_000_000
            / u128::from(self.spec.rate);
        let window = refill_us.div_ceil(1_000_000).max(1);
        (self.burst, u64::try_from(window).unwrap_or(u64::MAX))
    }

    fn applies_to(&self, route: &str) -> bool {
        self.spec
            .routes
            .as_ref()
            .is_none_or(|routes| routes.iter().any(|r| r == route))
    }
}

/// What to do when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Allow the request (availability first). The default.
    #[default]
    Open,
    /// Refuse it with 503.
    Closed,
}

/// Who is asking, as far as rate limiting is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Subjects<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The JWT subject, when authenticated.
    pub user: Option<&'a str>,
    /// The client id (JWT claim, or an anonymous caller's `X-Client-Id`).
    pub client: Option<&'a str>,
    /// The client address.
    pub ip: IpAddr,
}

/// One policy's state after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyState {
    /// Index into the limiter's policies.
    policy: usize,
    /// Requests that could be made right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No policy applies.
    Unlimited,
    /// Every applicable policy allowed the request (and counted it).
    Allowed(Vec<PolicyState>),
    /// At least one policy refused it; nothing was counted.
    Denied {
        /// The states reported (for a local denial, only the refusing policy).
        states: Vec<PolicyState>,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// Redis did not answer; the request passes (`GATEWAY_RATE_LIMIT_FAIL_MODE=open`).
    FailedOpen,
    /// Redis did not answer; the request is refused (`GATEWAY_RATE_LIMIT_FAIL_MODE=closed`).
    FailedClosed,
}

/// The rate limiter. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    service: &'static str,
    policies: Vec<Policy>,
    redis: Redis,
    prefix: String,
    timeout: Duration,
    fail_mode: FailMode,
    /// Keys known to be over their limit, until when.
    denied: Mutex<HashMap<String, Instant>>,
}

/// Settings of a [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// The service name (metrics label).
    pub service: &'static str,
    /// The validated policies.
    pub policies: Vec<Policy>,
    /// `REDIS_KEY_PREFIX`.
    pub prefix: String,
    /// Bound on one check's Redis round trip.
    pub timeout: Duration,
    /// What to do when Redis does not answer.
    pub fail_mode: FailMode,
}

/// Validates a policy list (names unique).
pub fn policies(specs: Vec<PolicySpec>) -> Result<Vec<Policy>, String> {
    let mut seen = std::collections::HashSet::new();
    specs
        .into_iter()
        .map(|spec| {
            if !seen.insert(spec.name.clone()) {
                return Err(format!(
                    "rate-limit policy {:?} is defined twice",
                    spec.name
                ));
            }
            Policy::new(spec)
        })
        .collect()
}

impl RateLimiter {
    /// A limiter over `redis` (connected in the background).
    pub fn new(redis: Redis, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                service: settings.service,
                policies: settings.policies,
                redis,
                prefix: settings.prefix,
                timeout: settings.timeout,
                fail_mode: settings.fail_mode,
                denied: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether any policy is configured.
    pub fn is_enabled(&self) -> bool {
        !self.inner.policies.is_empty()
    }

    /// Checks (and, when allowed, counts) one request against every applicable policy.
    pub async fn check(&self, subjects: &Subjects<'_>) -> Decision {
        let inner = &*self.inner;
        let mut applicable = Vec::new();
        let ip = subjects.ip.to_string();
        for (index, policy) in inner.policies.iter().enumerate() {
            if !policy.applies_to(subjects.route) {
                continue;
            }
            let subject = match policy.spec.key {
                KeyKind::User => subjects.user,
                KeyKind::Client => subjects.client,
                KeyKind::Ip => Some(ip.as_str()),
                KeyKind::Route => Some(subjects.route),
            };
            let Some(subject) = subject.filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT_LEN)
            else {
                continue;
            };
            let key = common::redis::tagged(
                &inner.prefix,
                &format!("rl:{}:", policy.spec.name),
                subject,
                inner.redis.is_cluster(),
            );
            applicable.push((index, key));
        }
        if applicable.is_empty() {
            return Decision::Unlimited;
        }
        if let Some(decision) = self.denied_locally(&applicable) {
            record(inner.service, "denied_cached");
            return decision;
        }
        match tokio::time::timeout(inner.timeout, self.run_script(&applicable)).await {
            Ok(Ok(decision)) => {
                record(
                    inner.service,
                    if matches!(decision, Decision::Allowed(_)) {
                        "allowed"
                    } else {
                        "denied"
                    },
                );
                decision
            }
            failure => {
                let error = match failure {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("no answer within {} ms", inner.timeout.as_millis()),
                };
                match inner.fail_mode {
                    FailMode::Open => {
                        tracing::warn!(%error, "Rate limiting unavailable; allowing (fail-open).");
                        record(inner.service, "fail_open");
                        Decision::FailedOpen
                    }
                    FailMode::Closed => {
                        tracing::warn!(%error, "Rate limiting unavailable; refusing (fail-closed).");
                        record(inner.service, "fail_closed");
                        Decision::FailedClosed
                    }
                }
            }
        }
    }

    fn denied_locally(&self, applicable: &[(usize, String)]) -> Option<Decision> {
        let denied = self
            .inner
            .denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if denied.is_empty() {
            return None;
        }
        let now = Instant::now();
        applicable.iter().find_map(|(index, key)| {
            let until = *denied.get(key)?;
            let retry_after = until.checked_duration_since(now)?;
            Some(Decision::Denied {
                states: vec![PolicyState {
                    policy: *index,
                    remaining: 0,
                    reset: retry_after,
                }],
                retry_after,
            })
        })
    }

    fn remember_denied(&self, key: &str, retry_after: Duration) {
        let mut denied = self
            .inner
            .denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if denied.len() >= DENIED_CACHE_CAPACITY {
            denied.retain(|_, until| *until > now);
            if denied.len() >= DENIED_CACHE_CAPACITY {
                return;
            }
        }
        denied.insert(key.to_owned(), now + retry_after);
    }

    /// Runs the GCRA script over `applicable`'s buckets: one script, so a request is counted
    /// by every policy or by none. On Redis Cluster each bucket's subject is its hash tag and a
    /// script runs per slot, concurrently: a request another slot's policy refuses is still
    /// counted by the policies that allowed it.
    async fn run_script(
        &self,
        applicable: &[(usize, String)],
    ) -> Result<Decision, common::redis::RedisError> {
        let inner = &*self.inner;
        let conn = inner.redis.connection()?;
        let (allowed, states, retry_after) = if inner.redis.is_cluster() {
            let mut by_slot: Vec<(redis::cluster_routing::Slot, Vec<(usize, String)>)> = Vec::new();
            for (index, key) in applicable {
                let slot = common::redis::slot_of(key);
                match by_slot.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, group)) => group.push((*index, key.clone())),
                    None => by_slot.push((slot, vec![(*index, key.clone())])),
                }
            }
            let results = futures::future::try_join_all(
                by_slot
                    .iter()
                    .map(|(_, group)| self.run_group(conn.clone(), group)),
            )
            .await?;
            let mut combined = (true, Vec::with_capacity(applicable.len()), Duration::ZERO);
            for (allowed, states, retry_after) in results {
                combined.0 &= allowed;
                combined.1.extend(states);
                combined.2 = combined.2.max(retry_after);
            }
            // Headers list the policies in their configured order.
            combined.1.sort_by_key(|state| state.policy);
            combined
        } else {
            self.run_group(conn, applicable).await?
        };
        Ok(if allowed {
            Decision::Allowed(states)
        } else {
            Decision::Denied {
                states,
                retry_after,
            }
        })
    }

    /// One script over `buckets` (on a cluster, buckets of one slot): whether all allow, each
    /// policy's state and the longest wait before a retry.
    async fn run_group(
        &self,
        mut conn: common::redis::RedisConnection,
        buckets: &[(usize, String)],
    ) -> Result<(bool, Vec<PolicyState>, Duration), common::redis::RedisError> {
        let inner = &*self.inner;
        let mut invocation = SCRIPT.prepare_invoke();
        for (index, key) in buckets {
            let policy = &inner.policies[*index];
            invocation
                .key(key)
                .arg(policy.interval_us)
                .arg(policy.burst);
        }
        let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        let malformed = || {
            common::redis::RedisError::Command(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected rate-limit script reply",
            )))
        };
        if reply.len() != 1 + 3 * buckets.len() {
            return Err(malformed());
        }
        let micros = |value: i64| Duration::from_micros(u64::try_from(value).unwrap_or(0));
        let mut states = Vec::with_capacity(buckets.len());
        let mut retry_after = Duration::ZERO;
        for ((index, key), values) in buckets.iter().zip(reply[1..].chunks_exact(3)) {
            let retry = micros(values[2]);
            if !retry.is_zero() {
                retry_after = retry_after.max(retry);
                self.remember_denied(key, retry);
            }
            states.push(PolicyState {
                policy: *index,
                remaining: u64::try_from(values[0]).unwrap_or(0),
                reset: micros(values[1]),
            });
        }
        Ok((reply[0] == 1, states, retry_after))
    }

    /// Adds `RateLimit-Policy` and `RateLimit` for the policies in `decision` (and
    /// `Retry-After` to a denial).
    pub fn write_headers(&self, decision: &Decision, headers: &mut HeaderMap) {
        let (states, retry_after) = match decision {
            Decision::Allowed(states) => (states, None),
            Decision::Denied {
                states,
                retry_after,
            } => (states, Some(*retry_after)),
            Decision::FailedClosed => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                return;
            }
            Decision::Unlimited | Decision::FailedOpen => return,
        };
        let policies = &self.inner.policies;
        let mut policy_list = sfv::ListSerializer::new();
        let mut state_list = sfv::ListSerializer::new();
        for state in states {
            let policy = &policies[state.policy];
            let Ok(name) = sfv::StringRef::from_str(&policy.spec.name) else {
                continue;
            };
            let (quota, window) = policy.advertised();
            policy_list
                .bare_item(name)
                .parameter(sfv::key_ref("q"), integer(quota))
                .parameter(sfv::key_ref("w"), integer(window));
            state_list
                .bare_item(name)
                .parameter(sfv::key_ref("r"), integer(state.remaining))
                .parameter(sfv::key_ref("t"), integer(ceil_seconds(state.reset)));
        }
        for (name, list) in [
            (RATELIMIT_POLICY, policy_list.finish()),
            (RATELIMIT, state_list.finish()),
        ] {
            if let Some(value) = list.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, value);
            }
        }
        if let Some(retry_after) = retry_after {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(ceil_seconds(retry_after).max(1)),
            );
        }
    }
}

/// A structured-field Integer (at most 15 digits; larger values are clamped).
fn integer(value: u64) -> sfv::Integer {
    sfv::Integer::try_from(value).unwrap_or(sfv::integer(999_999_999_999_999))
}

fn ceil_seconds(duration: Duration) -> u64 {
    duration.as_micros().div_ceil(1_000_000) as u64
}

fn record(service: &'static str, decision: &'static str) {
    metrics::counter!(GATEWAY_RATE_LIMIT_DECISIONS_TOTAL, "service" => service, "decision" => decision)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PolicySpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_policy_parses_from_the_operator_format_and_defaults_burst_to_rate() {
        let policy = Policy::new(spec(serde_json::json!(
            {"name": "per-user", "key": "user", "rate": 100, "period": "Minute"}
        )))
        .unwrap();
        assert_eq!(policy.burst, 100);
        assert_eq!(policy.interval_us, 600_000);
        assert!(policy.applies_to("anything"));

        let scoped = Policy::new(spec(serde_json::json!(
            {"name": "cmd", "key": "ip", "rate": 10, "period": "Second", "burst": 20,
             "routes": ["commands"]}
        )))
        .unwrap();
        assert_eq!((scoped.burst, scoped.interval_us), (20, 100_000));
        assert!(scoped.applies_to("commands"));
        assert!(!scoped.applies_to("documents"));
    }

    #[test]
    fn invalid_policies_are_rejected() {
        for json in [
            serde_json::json!({"name": "Upper", "key": "ip", "rate": 1, "period": "Second"}),
            serde_json::json!({"name": "a", "key": "ip", "rate": 0, "period": "Second"}),
            serde_json::json!({"name": "a", "key": "ip", "rate": 1, "period": "Second", "burst": 0}),
            serde_json::json!({"name": "a", "key": "ip", "rate": 2_000_000, "period": "Second"}),
        ] {
            assert!(Policy::new(spec(json.clone())).is_err(), "{json}");
        }
        let twice = vec![
            spec(serde_json::json!({"name": "a", "key": "ip", "rate": 1, "period": "Second"})),
            spec(serde_json::json!({"name": "a", "key": "user", "rate": 1, "period": "Second"})),
        ];
        assert!(policies(twice).unwrap_err().contains("twice"));
        assert!(
            serde_json::from_value::<PolicySpec>(serde_json::json!(
                {"name": "a", "key": "planet", "rate": 1, "period": "Second"}
            ))
            .is_err()
        );
    }

    #[test]
    fn the_advertised_window_is_the_time_the_burst_takes_to_refill() {
        for (rate, period, burst, advertised) in [
            (50, "Second", Some(100), (100, 2)),
            (50, "Second", None, (50, 1)),
            (50, "Second", Some(75), (75, 2)), // 1.5 s, rounded up: stricter, never looser
            (600, "Minute", Some(10), (10, 1)),
            (20, "Hour", Some(20), (20, 3600)),
            (100, "Minute", Some(1), (1, 1)), // 0.6 s: at least one second
            (1, "Hour", Some(3), (3, 3 * 3600)),
        ] {
            let policy = Policy::new(spec(serde_json::json!(
                {"name": "p", "key": "ip", "rate": rate, "period": period, "burst": burst}
            )))
            .unwrap();
            assert_eq!(
                policy.advertised(),
                advertised,
                "{rate}/{period} burst {burst:?}"
            );
        }
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(ceil_seconds(Duration::ZERO), 0);
        assert_eq!(ceil_seconds(Duration::from_micros(1)), 1);
        assert_eq!(ceil_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_seconds(Duration::from_secs(3)), 3);
    }
}
