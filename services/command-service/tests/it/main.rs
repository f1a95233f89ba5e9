//! Integration tests of the command-service against the real local dependencies (`just deps-up`).

use common::test_support::{
    Deps, assert_binary_lifecycle, assert_ready_degrades_without_dependency,
    assert_ready_tracks_dependency,
};

#[tokio::test]
async fn binary_becomes_ready_serves_metrics_and_exits_cleanly_on_sigterm() {
    assert_binary_lifecycle(
        env!("CARGO_BIN_EXE_command-service").as_ref(),
        command_service::NAME,
    )
    .await;
}

#[tokio::test]
async fn ready_is_503_naming_postgres_while_it_is_down_and_200_once_it_is_back() {
    let deps = Deps::from_env();
    assert_ready_tracks_dependency::<command_service::CommandService>(
        "postgres",
        "DATABASE_URL",
        &deps.database_url,
    )
    .await;
}

/// Kafka down is no reason to refuse commands: the outbox keeps them until it is back.
#[tokio::test]
async fn ready_stays_200_degraded_naming_kafka_while_it_is_down() {
    let deps = Deps::from_env();
    assert_ready_degrades_without_dependency::<command_service::CommandService>(
        "kafka",
        "KAFKA_BOOTSTRAP_SERVERS",
        &deps.kafka_bootstrap_servers,
    )
    .await;
}

mod commands;
mod documents;
mod plans;
