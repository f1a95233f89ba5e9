//! Integration tests of the ws-hub against the real local dependencies (`just deps-up`):
//! real Redis, hub instances on real ports, tokio-tungstenite clients.
#![allow(clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

mod hub;
mod rooms;
mod support;

use common::test_support::{Deps, assert_binary_lifecycle, assert_ready_tracks_dependency};

#[tokio::test]
async fn binary_becomes_ready_serves_metrics_and_exits_cleanly_on_sigterm() {
    assert_binary_lifecycle(env!("CARGO_BIN_EXE_ws-hub").as_ref(), ws_hub::NAME).await;
}

#[tokio::test]
async fn ready_is_503_naming_redis_while_it_is_down_and_200_once_it_is_back() {
    let deps = Deps::from_env();
    assert_ready_tracks_dependency::<ws_hub::WsHub>("redis", "REDIS_URL", &deps.redis_url).await;
}
