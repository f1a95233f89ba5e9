//! A database outage while commands arrive: retried for as long as it lasts, never
//! dead-lettered, and applied once the database is back.

use std::time::Duration;

use common::test_support::{Deps, TcpToggle, wait_until, with_port};
use processor::handler::Handlers;
use serde_json::json;

use crate::support::{InProcess, Stack};

/// The value of `command_retries_total` for `type` and `cause` in a Prometheus text body.
fn retries(metrics: &str, kind: &str, cause: &str) -> u64 {
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned())))
        .expect("a Prometheus text body");
    scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "command_retries_total"
                && s.labels.get("type") == Some(kind)
                && s.labels.get("cause") == Some(cause)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum::<f64>() as u64
}

#[tokio::test]
async fn a_database_outage_delays_commands_without_dead_lettering_them() {
    let stack = Stack::start(&[("COMMANDS_CUSTOM_TYPES", "outage-create")], None).await;
    let database_url = Deps::from_env().database_url;
    let mut toggle = TcpToggle::new(Deps::socket_of(&database_url));
    toggle.up().await;
    let vars = stack
        .vars()
        .with("DATABASE_URL", with_port(&database_url, toggle.port()))
        .with("DATABASE_ACQUIRE_TIMEOUT_MS", "1500")
        .with("PROCESSOR_MAX_ATTEMPTS", "2");
    // A type of its own, so the retry counter (process-wide) is this test's alone.
    let handlers = Handlers::built_in().with("outage-create", processor::handler::Create);
    let processor = InProcess::start(&vars, handlers).await;

    toggle.down().await;
    let command = stack
        .submit(json!({"type": "outage-create", "id": "o1", "payload": {"n": 1}}))
        .await;
    // More database retries than PROCESSOR_MAX_ATTEMPTS allows for handler errors…
    let metrics_url = format!("{}/metrics", processor.url);
    wait_until(
        "the processor to retry through the outage",
        Duration::from_secs(60),
        || {
            let url = metrics_url.clone();
            async move {
                let text = reqwest::get(url).await.unwrap().text().await.unwrap();
                retries(&text, "outage-create", "database") >= 4
            }
        },
    )
    .await;
    // …yet the command is still open, and succeeds once the database is back.
    let open = stack.status(command).await;
    assert!(
        matches!(open["status"].as_str(), Some("accepted" | "processing")),
        "{open}"
    );
    toggle.up().await;
    let status = stack.final_status(command).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["resultVersion"], 1);
    // The stack waits for the event to be relayed, which this processor may be doing.
    stack.stop().await;
    processor.stop().await;
}
