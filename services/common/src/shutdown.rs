//! Graceful shutdown: one [`CancellationToken`] per process, cancelled on SIGTERM or SIGINT.
//! Servers stop accepting, background tasks (relays, consumers, reconnect loops) watch the
//! same token and finish their current unit of work.

pub use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutdown signal received; draining.");
        cancel.cancel();
    });
    token
}

/// Cancels `background` and waits for its `tasks` — what a service does once its HTTP server
/// has drained. A task that panicked is logged, not propagated: the process is stopping anyway.
pub async fn stop_background(
    background: &CancellationToken,
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<()>>,
) {
    background.cancel();
    for task in tasks {
        if let Err(error) = task.await {
            tracing::error!(%error, "A background task panicked.");
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "Cannot install signal handlers; falling back to Ctrl-C.");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
