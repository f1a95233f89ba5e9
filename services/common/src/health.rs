//! Liveness and readiness.
//!
//! `/health` answers 200 while the process runs. `/ready` runs every registered dependency
//! [`Check`] concurrently, each bounded by a timeout, and answers 200 only when all pass,
//! otherwise 503; the JSON body names each dependency's state. Checks run on every request,
//! so a dependency that comes back turns the service ready again without a restart.

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
    /// `ready`, `not_ready` or `shutting_down`.
    pub status: &'static str,
    /// The service reporting.
    pub service: &'static str,
    /// Each dependency by name.
    pub dependencies: BTreeMap<&'static str, DependencyState>,
}

impl ReadinessReport {
    /// Whether the service should receive traffic.
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }

    /// Aggregates individual results: ready only when every dependency is up and the
    /// service is not draining.
    pub fn aggregate(
        service: &'static str,
        draining: bool,
        dependencies: BTreeMap<&'static str, DependencyState>,
    ) -> Self {
        let all_up = dependencies
            .values()
            .all(|d| d.status == DependencyStatus::Up);
        let status = match (draining, all_up) {
            (true, _) => "shutting_down",
            (false, true) => "ready",
            (false, false) => "not_ready",
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
    checks: Arc<Vec<Arc<dyn Check>>>,
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

    /// Adds a dependency check.
    #[must_use]
    pub fn with(mut self, check: impl Check + 'static) -> Self {
        Arc::make_mut(&mut self.checks).push(Arc::new(check));
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
        let results = join_all(self.checks.iter().map(|check| async move {
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
                Ok(()) => DependencyState { status: DependencyStatus::Up, error: None, latency_ms },
                Err(error) => {
                    DependencyState { status: DependencyStatus::Down, error: Some(error), latency_ms }
                }
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
