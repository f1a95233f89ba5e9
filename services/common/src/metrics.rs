//! Prometheus metrics: the process-wide recorder and every metric name the platform emits.
//!
//! Names are declared here once, with their unit in the name; services record through the
//! [`metrics`](::metrics) macros using these constants. `/metrics` renders the recorder.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: HTTP requests served. Labels: `service`, `method`, `route`, `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
/// Histogram: HTTP request duration. Labels: `service`, `method`, `route`, `status`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
/// Counter: requests refused with 503 because the node was at `HTTP_MAX_CONCURRENT_REQUESTS`.
/// Labels: `service`.
pub const HTTP_REQUESTS_SHED_TOTAL: &str = "http_requests_shed_total";
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
/// Histogram: commands written per transaction by the command service's group commit.
/// Labels: `service`.
pub const COMMANDS_BATCH_SIZE: &str = "commands_batch_size";
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
/// Counter: events the cache updater projected into the read model. Labels: `service`.
pub const CACHE_EVENTS_APPLIED_TOTAL: &str = "cache_events_applied_total";
/// Counter: events skipped because the read model already held their version or a newer one
/// (redeliveries, overtaken events). Labels: `service`.
pub const CACHE_EVENTS_STALE_TOTAL: &str = "cache_events_stale_total";
/// Counter: `events` messages that were not a valid event envelope (logged and skipped).
/// Labels: `service`.
pub const CACHE_EVENTS_MALFORMED_TOTAL: &str = "cache_events_malformed_total";
/// Histogram: time to apply one event (read-model script plus room notifications).
/// Labels: `service`.
pub const CACHE_APPLY_DURATION_SECONDS: &str = "cache_apply_duration_seconds";
/// Histogram: `events` messages the cache updater handled together as one batch (the first
/// message plus those already waiting, up to `CACHE_BATCH_MAX`). Labels: `service`.
pub const CACHE_BATCH_SIZE: &str = "cache_batch_size";
/// Counter: commands the processor finished. Labels: `service`, `type`, `outcome`
/// (`succeeded`, `failed`, `dead_lettered`, `duplicate` for a redelivery already applied).
pub const COMMANDS_PROCESSED_TOTAL: &str = "commands_processed_total";
/// Histogram: duration of one command handler invocation (built-in, Rust or webhook).
/// Labels: `service`, `type`.
pub const COMMAND_HANDLER_DURATION_SECONDS: &str = "command_handler_duration_seconds";
/// Counter: retries of a command after a transient error. Labels: `service`, `type`, `cause`
/// (`handler`, `database`).
pub const COMMAND_RETRIES_TOTAL: &str = "command_retries_total";
/// Histogram: commands the processor decided and wrote in one transaction. Labels: `service`.
pub const PROCESSOR_BATCH_SIZE: &str = "processor_batch_size";
/// Counter: messages copied to `commands.dlq`. Labels: `service`, `reason`.
pub const COMMANDS_DEAD_LETTERED_TOTAL: &str = "commands_dead_lettered_total";
/// Gauge: dead letters in `commands.dlq` not replayed yet: past the committed offsets of the
/// replay group (`processor replay-dlq`), summed over the partitions. Every processor pod
/// reports the same figure. Labels: `service`.
pub const DEAD_LETTERS_PENDING: &str = "dead_letters_pending";
/// Gauge: messages between a consumed offset and the partition's high watermark.
/// Labels: `service`, `topic`, `partition`.
pub const KAFKA_CONSUMER_LAG: &str = "kafka_consumer_lag";
/// Counter: reconciles of a `MiddlewareStack`. Labels: `result` (`ok`, `error`).
pub const OPERATOR_RECONCILES_TOTAL: &str = "operator_reconciles_total";
/// Gauge: reconciles running now (at most `RECONCILE_CONCURRENCY`). One that stays at the
/// limit while stacks wait points at a stuck reconcile (`RECONCILE_TIMEOUT_SECONDS` bounds it).
pub const OPERATOR_RECONCILES_IN_FLIGHT: &str = "operator_reconciles_in_flight";
/// Histogram: duration of one reconcile. Labels: `result`.
pub const OPERATOR_RECONCILE_DURATION_SECONDS: &str = "operator_reconcile_duration_seconds";
/// Histogram: duration of one step of a reconcile. Labels: `step` (`dereference`,
/// `dependencies`, `topics`, `credentials`, `scaling`, `apply` (one service), `status`,
/// `events`).
pub const OPERATOR_STEP_DURATION_SECONDS: &str = "operator_step_duration_seconds";
/// Counter: failed reconciles. Labels: `reason` (the condition reason, e.g. `RedisUnavailable`).
pub const OPERATOR_RECONCILE_ERRORS_TOTAL: &str = "operator_reconcile_errors_total";
/// Gauge: stacks whose stage condition has a given status.
/// Labels: `stage` (condition type), `status` (`True`, `False`, `Unknown`).
pub const OPERATOR_STACKS: &str = "operator_stacks";
/// Counter: requests the operator sent to the Kubernetes API. Labels: `verb` (HTTP method).
pub const OPERATOR_API_REQUESTS_TOTAL: &str = "operator_api_requests_total";
/// Counter: replica changes the operator decided for a consumer scaled on Kafka lag.
/// Labels: `service` (`processor`, `cache-updater`), `direction` (`up`, `down`).
pub const OPERATOR_SCALING_DECISIONS_TOTAL: &str = "operator_scaling_decisions_total";
/// Counter: `ConversionReview`s the operator's conversion webhook answered.
/// Labels: `desired` (the version asked for: `v1alpha1`, `v1beta1`, `other`), `result`
/// (`Success`, `Failure`).
pub const OPERATOR_CONVERSIONS_TOTAL: &str = "operator_conversions_total";
/// Gauge: when the conversion webhook's self-managed serving certificate expires (Unix
/// seconds); it is renewed with a third of its life left.
pub const OPERATOR_WEBHOOK_CERT_EXPIRY: &str =
    "operator_webhook_certificate_expiry_timestamp_seconds";
/// Gauge: 1 while this operator replica holds the leader Lease, else 0.
pub const OPERATOR_LEADER: &str = "operator_leader";
/// Gauge: WebSocket connections open on this hub node. Labels: `service`.
pub const HUB_CONNECTIONS: &str = "hub_connections";
/// Gauge: rooms with at least one local member (one Redis subscription each).
/// Labels: `service`.
pub const HUB_ROOMS: &str = "hub_rooms";
/// Counter: publications queued to local WebSocket clients. Labels: `service`.
pub const HUB_DELIVERIES_TOTAL: &str = "hub_deliveries_total";
/// Counter: publications accepted from WebSocket clients. Labels: `service`.
pub const HUB_PUBLICATIONS_TOTAL: &str = "hub_publications_total";
/// Counter: WebSocket connections closed. Labels: `service`, `reason` (`client`,
/// `slow_consumer`, `keepalive_timeout`, `rate_limited`, `message_too_big`, `token_expired`,
/// `draining`, `protocol_error`).
pub const HUB_DISCONNECTS_TOTAL: &str = "hub_disconnects_total";
/// Counter: upgrade requests refused before the handshake. Labels: `service`, `reason`
/// (`connection_limit`, `subject_limit`, `address_limit`, `draining`, `unauthorized`).
pub const HUB_CONNECTIONS_REJECTED_TOTAL: &str = "hub_connections_rejected_total";
/// Counter: client messages refused with an error frame. Labels: `service`, `code`.
pub const HUB_MESSAGES_REJECTED_TOTAL: &str = "hub_messages_rejected_total";
/// Histogram: from a publication's publish time (publisher's clock) to its fan-out to the
/// node's local subscribers. Labels: `service`.
pub const HUB_PUBLISH_DELIVER_SECONDS: &str = "hub_publish_deliver_seconds";
/// Counter: requests the gateway forwarded, by route name and final status (including 502/504
/// when the upstream failed). Labels: `service`, `route`, `status`.
pub const GATEWAY_PROXIED_REQUESTS_TOTAL: &str = "gateway_proxied_requests_total";
/// Histogram: time from sending a request upstream to its response headers.
/// Labels: `service`, `route`.
pub const GATEWAY_UPSTREAM_DURATION_SECONDS: &str = "gateway_upstream_duration_seconds";
/// Counter: rate-limit checks by outcome (`allowed`, `denied`, `denied_cached`, `fail_open`,
/// `fail_closed`). Labels: `service`, `decision`.
pub const GATEWAY_RATE_LIMIT_DECISIONS_TOTAL: &str = "gateway_rate_limit_decisions_total";
/// Counter: document reads from the Redis read model (`hit`, `deleted`, `miss`, `error`).
/// Labels: `service`, `result`.
pub const GATEWAY_READ_MODEL_LOOKUPS_TOTAL: &str = "gateway_read_model_lookups_total";
/// Counter: refused JWTs by reason (`common::auth::AuthError::reason`: `expired`,
/// `bad_signature`, `wrong_audience`, …, and `missing` when a required token is absent).
/// Labels: `service`, `reason`.
pub const JWT_FAILURES_TOTAL: &str = "jwt_failures_total";
/// Counter: requests refused because the token's grants do not allow them (403). Labels:
/// `service`, `action` (`read`, `write`).
pub const ACCESS_DENIED_TOTAL: &str = "access_denied_total";
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
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often the histogram samples recorded since the last fold are folded into buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the histograms' recent samples into their buckets every [`UPKEEP_INTERVAL`], on a
/// thread of its own (the recorder is installed before, and outside, any runtime).
///
/// The exporter keeps every sample a histogram records until a scrape or an upkeep folds it
/// in, and `build_recorder` leaves the upkeep to its caller. Without it a service nobody
/// scraped kept every request's samples: a gateway grew by 8.7 MiB in 30 s of 12.7k req/s,
/// without bound; with Prometheus, by what a scrape interval records.
#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated thread, not a runtime's worker, sleeps between upkeeps"
)]
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "Failed to start the metrics upkeep: histogram samples are folded at scrapes only.");
    }
}

/// A request counter and latency histogram per label set, registered on first use.
///
/// `metrics::counter!` with labels that are not `'static` builds an owned key, hashes and
/// compares it in the recorder's registry on every call: two such metrics per request were
/// ~6k instructions of the gateway's ~118k per proxied request. Handles looked up here by
/// `(tag, status, route)` cost a read lock and a hash of the route. The label sets are as
/// bounded as the metrics' own (route templates, configured routes, status codes).
#[derive(Debug, Default)]
pub struct RequestHandles {
    by_status: RwLock<HashMap<(&'static str, u16), ByRoute>>,
}

/// The handles of one `(tag, status)`, by route.
type ByRoute = HashMap<Box<str>, (Counter, Histogram)>;

impl RequestHandles {
    /// Counts one request and records its `seconds` in the handles of `(tag, status, route)`,
    /// registering them with `register` the first time. `tag` tells apart label sets that the
    /// status and route do not (the service's request metrics: the method; the proxy's: `""`).
    /// Two callers racing on a first registration get the same series from the recorder.
    pub fn record(
        &self,
        (tag, status, route): (&'static str, u16, &str),
        seconds: f64,
        register: impl FnOnce() -> (Counter, Histogram),
    ) {
        {
            let handles = self
                .by_status
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((counter, histogram)) = handles
                .get(&(tag, status))
                .and_then(|routes| routes.get(route))
            {
                counter.increment(1);
                histogram.record(seconds);
                return;
            }
        }
        let (counter, histogram) = register();
        counter.increment(1);
        histogram.record(seconds);
        self.by_status
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((tag, status))
            .or_default()
            .insert(route.into(), (counter, histogram));
    }
}

/// Records the build-info gauge for `service`.
pub fn record_build_info(service: &'static str) {
    metrics::gauge!(BUILD_INFO, "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
}

#[cfg(test)]
mod request_handles {
    use metrics::with_local_recorder;
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::RequestHandles;

    #[test]
    fn handles_are_registered_once_per_label_set_and_count_every_request() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let render = recorder.handle();
        let handles = RequestHandles::default();
        let mut registered = 0;
        with_local_recorder(&recorder, || {
            for (status, route) in [
                (200, "/a"),
                (200, "/a"),
                (404, "/a"),
                (200, "/b"),
                (200, "/a"),
            ] {
                handles.record(("GET", status, route), 0.002, || {
                    registered += 1;
                    let labels = [("route", route.to_owned()), ("status", status.to_string())];
                    (
                        metrics::counter!("test_requests_total", &labels),
                        metrics::histogram!("test_request_duration_seconds", &labels),
                    )
                });
            }
        });
        assert_eq!(
            registered, 3,
            "one registration per (method, status, route)"
        );
        let text = render.render();
        for series in [
            r#"test_requests_total{route="/a",status="200"} 3"#,
            r#"test_requests_total{route="/a",status="404"} 1"#,
            r#"test_requests_total{route="/b",status="200"} 1"#,
            r#"test_request_duration_seconds_count{route="/a",status="200"} 3"#,
        ] {
            assert!(text.contains(series), "{series} missing in {text}");
        }
    }
}

#[cfg(test)]
mod upkeep {
    use std::time::{Duration, Instant};

    fn threads() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .expect("this process's threads")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .collect()
    }

    /// Every process that installs the recorder folds its histogram samples on its own, scraped
    /// or not: the upkeep thread runs (it names itself once started).
    #[tokio::test]
    async fn installing_the_recorder_starts_the_upkeep() {
        let handle = super::install();
        metrics::histogram!(super::HTTP_REQUEST_DURATION_SECONDS, "service" => "upkeep-test")
            .record(0.001);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !threads().iter().any(|name| name == "metrics-upkeep") {
            assert!(
                Instant::now() < deadline,
                "no upkeep thread among {:?}",
                threads()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(handle.render().contains("upkeep-test"));
    }
}

#[cfg(test)]
mod drift {
    //! The chart's dashboards and alert rules query metrics by name: a metric renamed here
    //! and not there would leave a panel empty or an alert silent, with nothing failing.
    //! Every metric name their queries use must be one declared above.
    use std::collections::BTreeSet;

    const DASHBOARDS: [&str; 6] = [
        include_str!("../../../charts/meridian-operator/dashboards/api-gateway.json"),
        include_str!("../../../charts/meridian-operator/dashboards/command-service.json"),
        include_str!("../../../charts/meridian-operator/dashboards/processor.json"),
        include_str!("../../../charts/meridian-operator/dashboards/cache-updater.json"),
        include_str!("../../../charts/meridian-operator/dashboards/ws-hub.json"),
        include_str!("../../../charts/meridian-operator/dashboards/operator.json"),
    ];
    const RULES: &str =
        include_str!("../../../charts/meridian-operator/templates/prometheusrule.yaml");
    const DECLARED: &str = include_str!("metrics.rs");

    /// PromQL's functions, aggregations and keywords that the queries use.
    const PROMQL: &[&str] = &[
        "time",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "topk",
        "bottomk",
        "clamp_min",
        "clamp_max",
        "abs",
        "absent",
        "label_replace",
        "vector",
    ];

    /// The names declared as `pub const NAME: &str = "name";` above.
    fn declared() -> BTreeSet<String> {
        // rustfmt moves a long name's string to the next line.
        DECLARED
            .replace("=\n    \"", "= \"")
            .lines()
            .filter_map(|line| line.strip_prefix("pub const "))
            .filter_map(|rest| rest.split_once(": &str = \""))
            .filter_map(|(_, value)| value.split_once('"'))
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// Removes what is not a metric name from a query: strings, label matchers (`{…}`), ranges
    /// (`[…]`), grouping label lists (`by (…)` and the like), Grafana variables.
    fn metric_names(query: &str) -> Vec<String> {
        let mut kept = String::new();
        let (mut braces, mut brackets, mut in_string) = (0, 0, false);
        for c in query.chars() {
            match c {
                '"' if braces == 0 => in_string = !in_string,
                _ if in_string => {}
                '{' => braces += 1,
                '}' => braces -= 1,
                '[' => brackets += 1,
                ']' => brackets -= 1,
                _ if braces > 0 || brackets > 0 => {}
                c => kept.push(c),
            }
        }
        // Grouping label lists: `by (…)`, `without (…)`, `on (…)`, `ignoring (…)`,
        // `group_left (…)`, `group_right (…)`.
        let mut text = kept;
        for keyword in [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ] {
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(at) = find_word(rest, keyword) {
                out.push_str(&rest[..at]);
                let after = rest[at + keyword.len()..].trim_start();
                match after.strip_prefix('(') {
                    Some(list) => rest = list.split_once(')').map_or("", |(_, tail)| tail),
                    None => {
                        out.push_str(keyword);
                        rest = &rest[at + keyword.len()..];
                    }
                }
            }
            out.push_str(rest);
            text = out;
        }
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
            .filter(|t| !t.is_empty())
            .filter(|t| !t.starts_with('$') && !t.starts_with(|c: char| c.is_ascii_digit()))
            .filter(|t| !PROMQL.contains(t))
            .map(str::to_owned)
            .collect()
    }

    /// Where `word` starts in `text` as a whole word.
    fn find_word(text: &str, word: &str) -> Option<usize> {
        let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        text.match_indices(word).map(|(at, _)| at).find(|&at| {
            let before = text[..at].chars().next_back();
            let after = text[at + word.len()..].chars().next();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
    }

    fn queries() -> Vec<String> {
        let mut queries = Vec::new();
        for dashboard in DASHBOARDS {
            let json: serde_json::Value = serde_json::from_str(dashboard).unwrap();
            collect_exprs(&json, &mut queries);
        }
        // The rules' `expr:` values (one line, or a `|` block of indented lines).
        let mut lines = RULES.lines().peekable();
        while let Some(line) = lines.next() {
            let Some(expr) = line.trim_start().strip_prefix("expr:") else {
                continue;
            };
            let expr = expr.trim();
            if expr == "|" {
                let mut block = String::new();
                while let Some(next) = lines.next_if(|l| l.starts_with("              ")) {
                    block.push_str(next.trim());
                    block.push(' ');
                }
                queries.push(block);
            } else {
                queries.push(expr.split("{{").next().unwrap_or(expr).to_owned());
            }
        }
        queries
    }

    fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match value {
                        serde_json::Value::String(expr) if key == "expr" => out.push(expr.clone()),
                        other => collect_exprs(other, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_query_parser_finds_metric_names_only() {
        assert_eq!(
            metric_names(
                r#"histogram_quantile(0.99, sum by (le, namespace) (rate(x_seconds_bucket{service="a",namespace=~"$namespace"}[5m]))) / sum by (namespace) (y_total)"#
            ),
            ["x_seconds_bucket", "y_total"]
        );
    }

    #[test]
    fn every_metric_the_dashboards_and_alerts_query_is_declared() {
        let declared = declared();
        assert!(declared.len() > 40, "{declared:?}");
        let queries = queries();
        assert!(queries.len() > 50, "only {} queries found", queries.len());
        let mut unknown = BTreeSet::new();
        for query in &queries {
            for name in metric_names(query) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name);
                if !declared.contains(&name) && !declared.contains(base) {
                    unknown.insert(format!("{name} (in {query})"));
                }
            }
        }
        assert!(
            unknown.is_empty(),
            "queried but not declared in common::metrics:\n{}",
            unknown.into_iter().collect::<Vec<_>>().join("\n")
        );
    }
}
