//! Prometheus metrics: the process-wide recorder and every metric name the platform emits.
//!
//! Names are declared here once, with their unit in the name; services record through the
//! [`metrics`](::metrics) macros using these constants. `/metrics` renders the recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: HTTP requests served. Labels: `service`, `method`, `route`, `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
/// Histogram: HTTP request duration. Labels: `service`, `method`, `route`, `status`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
/// Gauge: 1 when the last readiness check of a dependency succeeded, else 0.
/// Labels: `service`, `dependency`.
pub const DEPENDENCY_UP: &str = "dependency_up";
/// Histogram: duration of a dependency's readiness check. Labels: `service`, `dependency`.
pub const DEPENDENCY_CHECK_DURATION_SECONDS: &str = "dependency_check_duration_seconds";
/// Counter: failed attempts to connect to a dependency at start-up.
/// Labels: `service`, `dependency`.
pub const DEPENDENCY_CONNECT_RETRIES_TOTAL: &str = "dependency_connect_retries_total";
/// Counter: commands accepted (stored with their outbox row). Labels: `service`, `type`.
pub const COMMANDS_ACCEPTED_TOTAL: &str = "commands_accepted_total";
/// Counter: command requests refused with a 4xx. Labels: `service`, `reason` (problem slug).
pub const COMMANDS_REJECTED_TOTAL: &str = "commands_rejected_total";
/// Counter: responses replayed for a repeated `Idempotency-Key`. Labels: `service`.
pub const IDEMPOTENCY_REPLAYS_TOTAL: &str = "idempotency_replays_total";
/// Counter: expired idempotency records deleted by the cleanup task. Labels: `service`.
pub const IDEMPOTENCY_KEYS_EXPIRED_TOTAL: &str = "idempotency_keys_expired_total";
/// Counter: outbox rows published and acknowledged by Kafka. Labels: `service`, `table`.
pub const OUTBOX_RELAYED_TOTAL: &str = "outbox_relayed_total";
/// Counter: outbox rows whose delivery failed (they stay and are retried).
/// Labels: `service`, `table`.
pub const OUTBOX_RELAY_FAILURES_TOTAL: &str = "outbox_relay_failures_total";
/// Gauge: rows waiting in the outbox, as last seen by the leading relay.
/// Labels: `service`, `table`.
pub const OUTBOX_BACKLOG: &str = "outbox_backlog";
/// Histogram: duration of one relay batch (read, publish, await acks, delete).
/// Labels: `service`, `table`.
pub const OUTBOX_RELAY_BATCH_DURATION_SECONDS: &str = "outbox_relay_batch_duration_seconds";
/// Gauge: always 1; labels carry `service` and `version`.
pub const BUILD_INFO: &str = "meridian_build_info";

/// Latency buckets (seconds) shared by every `_seconds` histogram: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder can only be present if a test installed one first; ours
            // still renders what is recorded through it.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Records the build-info gauge for `service`.
pub fn record_build_info(service: &'static str) {
    metrics::gauge!(BUILD_INFO, "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
}
