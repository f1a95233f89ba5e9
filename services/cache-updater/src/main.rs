//! The cache-updater binary. Everything it does lives in the library; see `cache_updater::CacheUpdater`.

fn main() -> anyhow::Result<()> {
    common::service::main::<cache_updater::CacheUpdater>()
}
