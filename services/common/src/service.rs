//! What a service binary is: [`Service`] says how to configure and start one, and [`main`]
//! is the whole of every service's `main.rs` (load config, init telemetry, bind, run).
//! This is the binaries' edge, so errors here are `anyhow` with context.

use anyhow::Context as _;
use std::future::Future;
use tokio::net::TcpListener;

use crate::config::{CommonConfig, ConfigError, Vars};
use crate::shutdown::CancellationToken;

/// A service's typed configuration.
pub trait ServiceConfig: Sized + Send + 'static {
    /// Reads every part from `vars`.
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError>;
    /// The settings every service has.
    fn common(&self) -> &CommonConfig;
}

/// A Meridian service.
pub trait Service {
    /// Name used in logs, traces and metrics (`command-service`, …).
    const NAME: &'static str;
    /// Port when `PORT` is unset.
    const DEFAULT_PORT: u16;
    /// The service's typed configuration.
    type Config: ServiceConfig;
    /// Builds the state and serves on `listener` until `shutdown` fires.
    fn start(
        listener: TcpListener,
        config: Self::Config,
        shutdown: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static;
}

/// The entry point of every service binary.
pub fn main<S: Service>() -> anyhow::Result<()> {
    run_job::<S, _, _>(|config, shutdown| async move {
        let addr = config.common().listen_addr(S::DEFAULT_PORT);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to bind {addr}"))?;
        S::start(listener, config, shutdown).await?;
        tracing::info!(service = S::NAME, "Stopped.");
        Ok(())
    })
}

/// Runs `job` as the service `S` runs (the entry point of a service binary, and of its
/// one-off subcommands: a rebuild, a replay): its configuration from the environment, its
/// telemetry, a stop on SIGTERM/SIGINT, a multi-threaded runtime until `job` returns.
pub fn run_job<S, F, Fut>(job: F) -> anyhow::Result<()>
where
    S: Service,
    F: FnOnce(S::Config, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = S::Config::from_vars(&Vars::from_env()).context("invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let _telemetry = crate::telemetry::init(S::NAME, config.common())?;
        job(config, crate::shutdown::on_signal()).await
    })
}

/// Declares mimalloc as the binary's global allocator; every service binary (and a benchmark
/// hosting services) calls it once at its crate root.
///
/// The services allocate and free small buffers on every request and message (header maps,
/// JSON values, Kafka payloads) across worker threads. In `perf` profiles glibc's malloc and
/// free took about a tenth of the gateway's CPU and about 30 % of the pipeline services'
/// (`_int_malloc`, `malloc_consolidate`, `unlink_chunk`); mimalloc's thread-local free lists
/// avoid most of that work.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL_ALLOCATOR: $crate::mimalloc::MiMalloc = $crate::mimalloc::MiMalloc;
    };
}
