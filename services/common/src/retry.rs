//! The one backoff policy for (re)connecting to dependencies: exponential from 100 ms to 5 s
//! with jitter, forever (the caller stops on shutdown). Built on `backon`.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::metrics::DEPENDENCY_CONNECT_RETRIES_TOTAL;
use crate::shutdown::CancellationToken;

/// The connect backoff: 100 ms doubling to 5 s, jittered, unbounded attempts.
pub fn connect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// Runs `attempt` until it succeeds or `shutdown` fires (then `None`), logging each failure
/// with the dependency's name and counting it in `dependency_connect_retries_total`.
pub async fn until_connected<T, E, F, Fut>(
    service: &'static str,
    dependency: &'static str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let retried = attempt.retry(connect_backoff()).sleep(tokio::time::sleep).notify(
        |error: &E, delay: Duration| {
            metrics::counter!(DEPENDENCY_CONNECT_RETRIES_TOTAL, "service" => service, "dependency" => dependency)
                .increment(1);
            tracing::warn!(%error, dependency, retry_in_ms = delay.as_millis() as u64, "Dependency not reachable yet.");
        },
    );
    tokio::select! {
        result = retried => result.ok(),
        () = shutdown.cancelled() => None,
    }
}
