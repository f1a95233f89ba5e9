//! Configuration: environment variables are read once, at start-up, into typed structs.
//!
//! Each struct here covers one concern and is deserialised from the same set of variables
//! (field `database_url` ↔ variable `DATABASE_URL`). A service's own `Config` composes the
//! pieces it needs. Secrets are [`SecretString`]s so `Debug` never prints them.
//! Nothing else in the platform reads the environment.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A configuration variable was missing or malformed.
#[derive(Debug, thiserror::Error)]
#[error("failed to read configuration: {0}")]
pub struct ConfigError(#[from] envy::Error);

/// The process environment, captured once. Tests build one from a list instead.
#[derive(Debug, Clone, Default)]
pub struct Vars(HashMap<String, String>);

impl Vars {
    /// Captures the process environment (the only place that reads it).
    pub fn from_env() -> Self {
        Self(std::env::vars().collect())
    }

    /// Builds from explicit pairs; later pairs win.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Returns a copy with `key` set to `value`.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// Deserialises one configuration struct from these variables.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        // Empty values count as unset, so `FOO=` in a manifest falls back to the default.
        let non_empty = self.0.iter().filter(|(_, v)| !v.is_empty());
        Ok(envy::from_iter(
            non_empty.map(|(k, v)| (k.clone(), v.clone())),
        )?)
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (development).
    #[default]
    Text,
    /// One JSON object per line (production, log shippers).
    Json,
}

/// Settings every service has.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonConfig {
    /// `BIND_ADDRESS`: address the HTTP server listens on. Default `0.0.0.0`.
    #[serde(default = "defaults::bind_address")]
    pub bind_address: IpAddr,
    /// `PORT`: HTTP port; each service has its own default (gateway 8080, command service
    /// 8082, processor 8083, cache updater 8084, WebSocket hub 8085).
    pub port: Option<u16>,
    /// `OPS_PORT`: a second port for `/ready` and `/metrics` (and `/health`), so that they
    /// stay off the port clients reach. Unset (default): they are served on `PORT` too.
    pub ops_port: Option<u16>,
    /// `LOG_FORMAT`: `text` (default) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// `RUST_LOG`: log filter directives. Default `info`.
    #[serde(default = "defaults::rust_log")]
    pub rust_log: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: OTLP/HTTP collector base URL (for example
    /// `http://otel-collector:4318`). Unset: spans are not exported (logs still carry ids).
    pub otel_exporter_otlp_endpoint: Option<url::Url>,
    /// `OTEL_SERVICE_NAME`: overrides the service name reported in traces.
    pub otel_service_name: Option<String>,
    /// `OTEL_TRACES_SAMPLER_ARG`: head sampling ratio for new traces, 0.0–1.0. Default 1.0.
    /// Incoming sampled parents are always honoured (parent-based sampling).
    #[serde(default = "defaults::sampling_ratio")]
    pub otel_traces_sampler_arg: f64,
    /// `READINESS_TIMEOUT_MS`: per-dependency timeout of a `/ready` check. Default 2000.
    #[serde(default = "defaults::readiness_timeout_ms")]
    pub readiness_timeout_ms: u64,
    /// `SHUTDOWN_GRACE_SECONDS`: after SIGTERM, how long in-flight work may take. Default 25
    /// (under Kubernetes' default 30 s termination grace period).
    #[serde(default = "defaults::shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// `HTTP_HEADER_READ_TIMEOUT_MS`: how long a client has to send a request's headers, and
    /// so how long an idle keep-alive connection stays open (keep a load balancer's idle
    /// timeout below it). Default 30000.
    #[serde(default = "defaults::http_header_read_timeout_ms")]
    pub http_header_read_timeout_ms: u64,
    /// `HTTP_BODY_TIMEOUT_MS`: the longest wait for the next part of a request body; a body
    /// that stalls longer fails the request. Default 30000.
    #[serde(default = "defaults::http_body_timeout_ms")]
    pub http_body_timeout_ms: u64,
    /// `HTTP_MAX_CONCURRENT_REQUESTS`: requests handled at once; beyond it a request is
    /// answered 503 with `Retry-After` at once (`/health`, `/ready`, `/metrics` are exempt).
    /// Default 1024.
    #[serde(default = "defaults::http_max_concurrent_requests")]
    pub http_max_concurrent_requests: usize,
}

impl CommonConfig {
    /// The socket address to bind, using `default_port` when `PORT` is unset.
    pub fn listen_addr(&self, default_port: u16) -> SocketAddr {
        SocketAddr::new(self.bind_address, self.port.unwrap_or(default_port))
    }

    /// The socket address of the ops port, when `OPS_PORT` is set.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_port
            .map(|port| SocketAddr::new(self.bind_address, port))
    }

    /// Per-dependency readiness timeout.
    pub fn readiness_timeout(&self) -> Duration {
        Duration::from_millis(self.readiness_timeout_ms)
    }

    /// Grace period for draining after a shutdown signal.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}

/// PostgreSQL connection settings.
#[derive(Debug, Clone, Deserialize)]
pub struct PostgresConfig {
    /// `DATABASE_URL`: `postgres://user:password@host:port/database?sslmode=…`.
    /// Default `postgres://postgres:postgres@127.0.0.1:5432/middleware` (the local dev server).
    #[serde(default = "defaults::database_url")]
    pub database_url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS`: pool size. Default 10.
    #[serde(default = "defaults::database_max_connections")]
    pub database_max_connections: u32,
    /// `DATABASE_ACQUIRE_TIMEOUT_MS`: how long a request waits for a pooled connection.
    /// Default 5000.
    #[serde(default = "defaults::timeout_5s")]
    pub database_acquire_timeout_ms: u64,
    /// `DATABASE_STATEMENT_TIMEOUT_MS`: server-side `statement_timeout`. Default 5000.
    #[serde(default = "defaults::timeout_5s")]
    pub database_statement_timeout_ms: u64,
}

/// Redis connection settings.
#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    /// `REDIS_URL`: `redis://[user:password@]host:port[/db]` (or `rediss://`).
    /// Default `redis://127.0.0.1:6379`.
    #[serde(default = "defaults::redis_url")]
    pub redis_url: SecretString,
    /// `REDIS_KEY_PREFIX`: prefix of every key and channel this stack uses; the operator's
    /// Redis ACL user is restricted to it. Default `meridian:`.
    #[serde(default = "defaults::redis_key_prefix")]
    pub redis_key_prefix: String,
    /// `REDIS_TIMEOUT_MS`: connect and response timeout. Default 1000.
    #[serde(default = "defaults::redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// `REDIS_CA_FILE`: a PEM file of the CA(s) a `rediss://` server's certificate must chain
    /// to, instead of the system's trusted roots (a private CA).
    pub redis_ca_file: Option<String>,
    /// `REDIS_CLUSTER`: `REDIS_URL` names Redis Cluster nodes (one or more, comma-separated,
    /// with the same credentials); the others are discovered. Keys that a script uses together
    /// carry a hash tag, and rooms use sharded pub/sub. Default false (one Redis).
    #[serde(default)]
    pub redis_cluster: bool,
}

/// Kafka connection settings (librdkafka names in parentheses).
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaConfig {
    /// `KAFKA_BOOTSTRAP_SERVERS` (`bootstrap.servers`). Default `127.0.0.1:9092`.
    #[serde(default = "defaults::kafka_bootstrap_servers")]
    pub kafka_bootstrap_servers: String,
    /// `KAFKA_TOPIC_PREFIX`: prepended to every topic name (`commands`, `events`, `cache`,
    /// `commands.dlq`), so several stacks can share a cluster. Default empty.
    #[serde(default)]
    pub kafka_topic_prefix: String,
    /// `KAFKA_SECURITY_PROTOCOL` (`security.protocol`): `plaintext` (default), `ssl`,
    /// `sasl_plaintext`, `sasl_ssl`.
    #[serde(default = "defaults::kafka_security_protocol")]
    pub kafka_security_protocol: String,
    /// `KAFKA_SASL_MECHANISM` (`sasl.mechanism`), e.g. `SCRAM-SHA-512`.
    pub kafka_sasl_mechanism: Option<String>,
    /// `KAFKA_SASL_USERNAME` (`sasl.username`).
    pub kafka_sasl_username: Option<String>,
    /// `KAFKA_SASL_PASSWORD` (`sasl.password`).
    pub kafka_sasl_password: Option<SecretString>,
    /// `KAFKA_SSL_CA_LOCATION` (`ssl.ca.location`): a PEM file of the CA that signed the
    /// brokers' certificates. Unset: the system's trusted roots.
    pub kafka_ssl_ca_location: Option<String>,
    /// `KAFKA_TIMEOUT_MS`: metadata and delivery timeouts. Default 5000.
    #[serde(default = "defaults::timeout_5s")]
    pub kafka_timeout_ms: u64,
    /// `KAFKA_LINGER_MS` (`linger.ms`): how long a producer waits to fill a batch. Default 1:
    /// the outbox relays already hand the producer whole batches, so waiting longer only adds
    /// to every message's latency (each of the pipeline's two Kafka hops paid 5 ms more at 5).
    #[serde(default = "defaults::kafka_linger_ms")]
    pub kafka_linger_ms: u64,
    /// `KAFKA_SESSION_TIMEOUT_MS` (`session.timeout.ms`, heartbeats every third of it): how
    /// long the partitions of a crashed consumer stay unassigned before another member (or
    /// its restarted self) takes them over. The broker bounds it (by default 6000–1800000).
    /// Default 10000.
    #[serde(default = "defaults::kafka_session_timeout_ms")]
    pub kafka_session_timeout_ms: u64,
}

impl KafkaConfig {
    /// The full name of a platform topic (`commands`, `events`, …) with the stack's prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.kafka_topic_prefix)
    }
}

mod defaults {
    use super::*;

    pub fn bind_address() -> IpAddr {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
    pub fn rust_log() -> String {
        "info".into()
    }
    pub fn sampling_ratio() -> f64 {
        1.0
    }
    pub fn readiness_timeout_ms() -> u64 {
        2000
    }
    pub fn shutdown_grace_seconds() -> u64 {
        25
    }
    pub fn database_url() -> SecretString {
        "postgres://postgres:postgres@127.0.0.1:5432/middleware".into()
    }
    pub fn database_max_connections() -> u32 {
        10
    }
    pub fn timeout_5s() -> u64 {
        5000
    }
    pub fn kafka_session_timeout_ms() -> u64 {
        10_000
    }
    pub fn kafka_linger_ms() -> u64 {
        1
    }
    pub fn redis_url() -> SecretString {
        "redis://127.0.0.1:6379".into()
    }
    pub fn redis_key_prefix() -> String {
        "meridian:".into()
    }
    pub fn http_header_read_timeout_ms() -> u64 {
        30_000
    }
    pub fn http_body_timeout_ms() -> u64 {
        30_000
    }
    pub fn http_max_concurrent_requests() -> usize {
        1024
    }
    pub fn redis_timeout_ms() -> u64 {
        1000
    }
    pub fn kafka_bootstrap_servers() -> String {
        "127.0.0.1:9092".into()
    }
    pub fn kafka_security_protocol() -> String {
        "plaintext".into()
    }
}

#[cfg(test)]
mod tests;
