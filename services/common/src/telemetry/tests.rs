use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::message::{Message, OwnedMessage, Timestamp};

use super::*;

fn remote_context() -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

#[test]
fn http_trace_context_round_trips_through_headers() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let mut headers = http::HeaderMap::new();
    global::get_text_map_propagator(|p| {
        p.inject_context(&remote_context(), &mut HeaderInjector(&mut headers))
    });
    assert_eq!(
        headers["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );

    let extracted = extract_http(&headers);
    assert_eq!(
        extracted.span().span_context().trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[test]
fn kafka_trace_context_round_trips_through_message_headers() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let mut injector = KafkaHeaderInjector(Some(OwnedHeaders::new().insert(Header {
        key: "message-type",
        value: Some("x"),
    })));
    global::get_text_map_propagator(|p| p.inject_context(&remote_context(), &mut injector));
    let headers = injector.0.unwrap();

    let message = OwnedMessage::new(
        None,
        None,
        "t".into(),
        Timestamp::NotAvailable,
        0,
        0,
        Some(headers),
    );
    let cx = extract_kafka(message.headers());
    assert_eq!(
        cx.span().span_context().span_id().to_string(),
        "00f067aa0ba902b7"
    );
    assert!(cx.span().span_context().is_sampled());
    // Existing headers are kept.
    assert_eq!(
        message.headers().unwrap().iter().next().unwrap().key,
        "message-type"
    );
}

#[test]
fn a_message_without_headers_yields_an_empty_context() {
    assert!(
        !extract_kafka::<OwnedHeaders>(None)
            .span()
            .span_context()
            .is_valid()
    );
}

fn decision(sampler: &opentelemetry_sdk::trace::Sampler, parent: Option<&Context>) -> bool {
    use opentelemetry::trace::SpanKind;
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
    let result = sampler.should_sample(
        parent,
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        "span",
        &SpanKind::Server,
        &[],
        &[],
    );
    result.decision == SamplingDecision::RecordAndSample
}

#[test]
fn new_traces_are_sampled_only_when_spans_are_exported_and_sampled_parents_always() {
    let unsampled_parent = Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::default(),
        true,
        TraceState::default(),
    ));
    let exporting = sampler(true, 1.0);
    assert!(decision(&exporting, None));
    assert!(decision(&exporting, Some(&remote_context())));
    assert!(!decision(&exporting, Some(&unsampled_parent)));
    assert!(!decision(&sampler(true, 0.0), None));

    let silent = sampler(false, 1.0);
    assert!(!decision(&silent, None), "nothing exports a new trace here");
    assert!(
        decision(&silent, Some(&remote_context())),
        "a sampled caller's trace stays sampled for the services after this one"
    );
    assert!(!decision(&silent, Some(&unsampled_parent)));
}
