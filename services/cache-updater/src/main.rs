//! The cache-updater binary. Everything it does lives in the library; see
//! `cache_updater::CacheUpdater` (the service) and `cache_updater::rebuild` (`cache-updater
//! rebuild`: replay `events` into an emptied read model, then exit).

common::global_allocator!();

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("rebuild") => cache_updater::rebuild::main(),
        Some(other) => anyhow::bail!("unknown subcommand {other:?} (the only one is `rebuild`)"),
        None => common::service::main::<cache_updater::CacheUpdater>(),
    }
}
