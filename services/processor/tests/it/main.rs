//! Integration tests of the processor against the real local dependencies (`just deps-up`).
//! The pipeline tests start the command service binary: build it first
//! (`cargo build -p command-service -p processor --bins`; `just test` does).
#![allow(clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

use common::test_support::{Deps, assert_binary_lifecycle, assert_ready_tracks_dependency};

#[tokio::test]
async fn binary_becomes_ready_serves_metrics_and_exits_cleanly_on_sigterm() {
    assert_binary_lifecycle(env!("CARGO_BIN_EXE_processor").as_ref(), processor::NAME).await;
}

#[tokio::test]
async fn ready_is_503_naming_kafka_while_it_is_down_and_200_once_it_is_back() {
    let deps = Deps::from_env();
    assert_ready_tracks_dependency::<processor::Processor>(
        "kafka",
        "KAFKA_BOOTSTRAP_SERVERS",
        &deps.kafka_bootstrap_servers,
    )
    .await;
}

mod crash;
mod outage;
mod pipeline;
mod plans;
mod store;
mod support;
