//! Integration tests of the api-gateway against the real local dependencies (`just deps-up`):
//! real Redis, real HTTP on ports, the gateway in process or as two binaries.
// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used, clippy::panic)]

mod auth;
mod ratelimit;
mod routing;
mod support;

use common::test_support::{
    Deps, assert_binary_lifecycle, assert_ready_degrades_without_dependency,
};

#[tokio::test]
async fn binary_becomes_ready_serves_metrics_and_exits_cleanly_on_sigterm() {
    assert_binary_lifecycle(
        env!("CARGO_BIN_EXE_api-gateway").as_ref(),
        api_gateway::NAME,
    )
    .await;
}

/// Without Redis the gateway serves on: reads fall back to the write model and rate limiting
/// fails open, so its readiness stays 200 (`degraded`).
#[tokio::test]
async fn ready_stays_200_degraded_naming_redis_while_it_is_down() {
    let deps = Deps::from_env();
    assert_ready_degrades_without_dependency::<api_gateway::ApiGateway>(
        "redis",
        "REDIS_URL",
        &deps.redis_url,
    )
    .await;
}
