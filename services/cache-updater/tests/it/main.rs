//! Integration tests of the cache-updater against the real local dependencies (`just deps-up`).
//!
//! - `readmodel`: the version-guarded script on Redis.
//! - `projection`: the service fed with events produced directly to Kafka; `rebuild`.
//! - `pipeline`: the whole chain, command service → processor → cache updater.
#![allow(clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

use common::test_support::{Deps, assert_binary_lifecycle, assert_ready_tracks_dependency};

mod freshness;
mod pipeline;
mod projection;
mod readmodel;
mod support;

#[tokio::test]
async fn binary_becomes_ready_serves_metrics_and_exits_cleanly_on_sigterm() {
    assert_binary_lifecycle(
        env!("CARGO_BIN_EXE_cache-updater").as_ref(),
        cache_updater::NAME,
    )
    .await;
}

#[tokio::test]
async fn ready_is_503_naming_redis_while_it_is_down_and_200_once_it_is_back() {
    let deps = Deps::from_env();
    assert_ready_tracks_dependency::<cache_updater::CacheUpdater>(
        "redis",
        "REDIS_URL",
        &deps.redis_url,
    )
    .await;
}

#[tokio::test]
async fn ready_is_503_naming_kafka_while_it_is_down_and_200_once_it_is_back() {
    let deps = Deps::from_env();
    assert_ready_tracks_dependency::<cache_updater::CacheUpdater>(
        "kafka",
        "KAFKA_BOOTSTRAP_SERVERS",
        &deps.kafka_bootstrap_servers,
    )
    .await;
}
