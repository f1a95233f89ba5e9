use std::time::Duration;

use common::config::{CommonConfig, KafkaConfig, Vars};
use common::health::Check;
use common::kafka::{self, HEADER_MESSAGE_TYPE, KafkaCheck};
use common::telemetry;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::Message;
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[tokio::test]
async fn a_message_round_trips_through_kafka_with_its_trace_context() {
    let vars = Vars::from_env();
    let config: KafkaConfig = vars.parse().unwrap();
    let _telemetry =
        telemetry::init("kafka-smoke", &vars.parse::<CommonConfig>().unwrap()).unwrap();

    let topic = format!("smoke-{}", uuid::Uuid::new_v4());
    let admin = kafka::admin(&config, "smoke-admin").unwrap();
    kafka::ensure_topics(&admin, &[(&topic, 3)], 1)
        .await
        .unwrap();
    // Creating it again is a no-op, not an error.
    kafka::ensure_topics(&admin, &[(&topic, 3)], 1)
        .await
        .unwrap();

    let producer = kafka::producer(&config, "smoke-producer").unwrap();
    KafkaCheck::producer(&producer, Duration::from_secs(5))
        .check()
        .await
        .unwrap();

    // Produce inside a span that continues a remote trace, as a relay would.
    let trace_id = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
    let span = tracing::info_span!("relay.publish");
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(
        SpanContext::new(
            trace_id,
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ),
    ));
    let headers = span.in_scope(|| {
        telemetry::inject_kafka(OwnedHeaders::new().insert(Header {
            key: HEADER_MESSAGE_TYPE,
            value: Some("smoke"),
        }))
    });
    producer
        .send(
            FutureRecord::to(&topic)
                .key("docs/1")
                .payload(r#"{"hello":"kafka"}"#)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let consumer = kafka::consumer(
        &config,
        "smoke-consumer",
        &format!("smoke-{}", uuid::Uuid::new_v4()),
    )
    .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.key(), Some(&b"docs/1"[..]));
    assert_eq!(message.payload(), Some(&br#"{"hello":"kafka"}"#[..]));
    let headers = message.headers().unwrap();
    assert!(
        headers
            .iter()
            .any(|h| h.key == HEADER_MESSAGE_TYPE && h.value == Some(&b"smoke"[..]))
    );
    let cx = telemetry::extract_kafka(Some(headers));
    assert_eq!(
        cx.span().span_context().trace_id(),
        trace_id,
        "the consumer continues the producer's trace"
    );
    consumer.store_offset_from_message(&message).unwrap();
    drop(message);

    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .unwrap();
}
