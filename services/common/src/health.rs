//! Liveness and readiness.
//!
//! `/health` answers 200 while the process runs. `/ready` runs every registered dependency
//! [`Check`] concurrently, each bounded by a timeout, and answers 200 when every *required*
//! one passes, otherwise 503; the JSON body names each dependency's state. A dependency the
//! service can serve without (the command service's Kafka: the outbox buffers; the gateway's
//! Redis: rate limiting fails open, reads fall back) is *optional*: when it is down the
//! status is `degraded`, still 200, so a blip does not empty the service's endpoints. Checks
//! run on every request, so a dependency that comes back turns the service ready again without
//! a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, join_all};
use serde::Serialize;

use crate::metrics::{DEPENDENCY_CHECK_DURATION_SECONDS, DEPENDENCY_UP};

/// One dependency's readiness probe.
pub trait Check: Send + Sync {
    /// Short, stable name (`postgres`, `redis`, `kafka`), used in the report and metrics.
    fn name(&self) -> &'static str;
    /// Succeeds when the dependency is usable; the error says why not (never a secret).
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// State of one dependency in a readiness report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DependencyState {
    /// `up` or `down`.
    pub status: DependencyStatus,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the check took.
    pub latency_ms: u64,
    /// Whether the service is unready while this dependency is down (otherwise degraded).
    pub required: bool,
}

/// Whether a dependency is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DependencyStatus {
    /// The check passed.
    Up,
    /// The check failed or timed out.
    Down,
}

/// The body of `/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    /// `ready`, `degraded` (an optional dependency is down), `not_ready` or `shutting_down`.
    pub status: &'static str,
    /// The service reporting.
    pub service: &'static str,
    /// Each dependency by name.
    pub dependencies: BTreeMap<&'static str, DependencyState>,
}

impl ReadinessReport {
    /// Whether the service should receive traffic.
    pub fn is_ready(&self) -> bool {
        matches!(self.status, "ready" | "degraded")
    }

    /// Aggregates individual results: ready when every required dependency is up and the
    /// service is not draining; degraded when an optional one is down.
    pub fn aggregate(
        service: &'static str,
        draining: bool,
        dependencies: BTreeMap<&'static str, DependencyState>,
    ) -> Self {
        let down = |required: bool| {
            dependencies
                .values()
                .any(|d| d.required == required && d.status == DependencyStatus::Down)
        };
        let status = if draining {
            "shutting_down"
        } else if down(true) {
            "not_ready"
        } else if down(false) {
            "degraded"
        } else {
            "ready"
        };
        Self {
            status,
            service,
            dependencies,
        }
    }
}

/// The set of checks behind `/ready`, cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    service: &'static str,
    timeout: Duration,
    /// Each check and whether it is required.
    checks: Arc<Vec<(Arc<dyn Check>, bool)>>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// No checks yet; each runs with `timeout`.
    pub fn new(service: &'static str, timeout: Duration) -> Self {
        Self {
            service,
            timeout,
            checks: Arc::default(),
            draining: Arc::default(),
        }
    }

    /// Adds a required dependency check: while it fails, the service is not ready.
    #[must_use]
    pub fn with(mut self, check: impl Check + 'static) -> Self {
        Arc::make_mut(&mut self.checks).push((Arc::new(check), true));
        self
    }

    /// Adds an optional dependency check: while it fails, the service is degraded but ready.
    #[must_use]
    pub fn with_optional(mut self, check: impl Check + 'static) -> Self {
        Arc::make_mut(&mut self.checks).push((Arc::new(check), false));
        self
    }

    /// The service's name.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// From now on report `shutting_down` (503) so load balancers stop sending traffic.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Runs every check concurrently and aggregates the results.
    pub async fn report(&self) -> ReadinessReport {
        let results = join_all(self.checks.iter().map(|(check, required)| async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(self.timeout, check.check()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(format!("check timed out after {} ms", self.timeout.as_millis())),
            };
            let elapsed = started.elapsed();
            let name = check.name();
            metrics::histogram!(DEPENDENCY_CHECK_DURATION_SECONDS, "service" => self.service, "dependency" => name)
                .record(elapsed.as_secs_f64());
            metrics::gauge!(DEPENDENCY_UP, "service" => self.service, "dependency" => name)
                .set(if outcome.is_ok() { 1.0 } else { 0.0 });
            let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            let state = match outcome {
                Ok(()) => DependencyState {
                    status: DependencyStatus::Up,
                    error: None,
                    latency_ms,
                    required: *required,
                },
                Err(error) => DependencyState {
                    status: DependencyStatus::Down,
                    error: Some(error),
                    latency_ms,
                    required: *required,
                },
            };
            (name, state)
        }))
        .await;
        ReadinessReport::aggregate(
            self.service,
            self.draining.load(Ordering::Relaxed),
            results.into_iter().collect(),
        )
    }
}

#[cfg(test)]
mod tests;
