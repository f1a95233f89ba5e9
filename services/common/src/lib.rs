//! What every Meridian service shares, so that nothing is written twice: typed configuration,
//! telemetry (tracing, JSON logs, OTLP export, W3C trace-context propagation over HTTP and
//! Kafka headers), Prometheus metrics, liveness and readiness, graceful shutdown, and the
//! clients for PostgreSQL, Redis and Kafka with start-up retry.
//!
//! # Layout
//! - [`config`]: environment variables → typed structs, with documented defaults.
//! - [`auth`]: JWT verification (HMAC secret, PEM public key, cached JWKS) for the edge services.
//! - [`access`]: what a verified token allows (document read/write and room patterns).
//! - [`telemetry`]: subscriber set-up and trace-context propagation helpers.
//! - [`metrics`]: the Prometheus recorder and every metric name the platform emits.
//! - [`health`]: dependency checks and the readiness report behind `/ready`.
//! - [`http`]: the operational routes (`/health`, `/ready`, `/metrics`), HTTP middleware and
//!   `serve` with graceful shutdown.
//! - [`shutdown`]: SIGTERM/SIGINT handling and the cancellation token every task watches.
//! - [`postgres`], [`redis`], [`kafka`]: client constructors and their readiness checks.
//! - [`envelope`]: the command and event envelopes on the Kafka topics.
//! - [`schema`]: the stack's one sqlx migration set (commands, idempotency keys, outbox).
//! - [`outbox`]: the transactional outbox (enqueue in a transaction) and its Kafka relay.
//! - [`readmodel`]: the Redis read model (version-guarded document projections).
//! - [`problem`]: RFC 9457 problem details with the platform's problem types.
//! - [`retry`]: the one backoff policy used to (re)connect to dependencies.
//! - [`rooms`]: WebSocket rooms in Redis: atomic publish (history stream + epoch/offset +
//!   pub/sub channel) and resume reads.
//! - [`service`]: the `Service` trait and the `main` every service binary calls, and
//!   [`global_allocator!`], the allocator each of them declares.
//! - `test_support` (feature `test-support`): helpers for integration tests.

#[doc(hidden)]
pub use mimalloc; // for `global_allocator!`

pub mod access;
pub mod auth;
pub mod config;
pub mod envelope;
pub mod health;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod outbox;
pub mod postgres;
pub mod problem;
#[cfg(feature = "procstat")]
pub mod procstat;
pub mod readmodel;
pub mod redis;
pub mod redis_acl;
pub mod retry;
pub mod rooms;
pub mod schema;
pub mod service;
pub mod shutdown;
pub mod telemetry;

#[cfg(feature = "test-support")]
pub mod test_support;
