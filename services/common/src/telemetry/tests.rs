use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::message::{Message, OwnedMessage, Timestamp};

use super::*;

fn remote_context() -> Context {
    remote_context_with(TraceState::default())
}

fn remote_context_with(state: TraceState) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        state,
    ))
}

#[test]
fn http_trace_context_round_trips_through_headers() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let mut headers = http::HeaderMap::new();
    global::get_text_map_propagator(|p| {
        p.inject_context(&remote_context(), &mut HttpTraceInjector(&mut headers))
    });
    assert_eq!(
        headers["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert!(
        !headers.contains_key("tracestate"),
        "an empty tracestate is not sent"
    );

    let extracted = extract_http(&headers);
    assert_eq!(
        extracted.span().span_context().trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[test]
fn a_tracestate_is_carried_when_it_has_entries_and_a_stale_one_is_dropped() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let mut headers = http::HeaderMap::new();
    let with_state =
        remote_context_with(TraceState::from_key_value([("vendor", "value")]).unwrap());
    global::get_text_map_propagator(|p| {
        p.inject_context(&with_state, &mut HttpTraceInjector(&mut headers))
    });
    assert_eq!(headers["tracestate"], "vendor=value");
    // The next context has no state: the old one must not travel with it.
    global::get_text_map_propagator(|p| {
        p.inject_context(&remote_context(), &mut HttpTraceInjector(&mut headers))
    });
    assert!(!headers.contains_key("tracestate"));
    assert_eq!(headers.len(), 1, "{headers:?}");
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
    assert!(
        headers.iter().all(|h| h.key != "tracestate"),
        "an empty tracestate is not sent"
    );

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

#[test]
fn a_traceparent_value_round_trips_and_says_whether_it_is_sampled() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cx = context_from_traceparent(sampled);
    assert_eq!(
        cx.span().span_context().trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    let continued = sampled_context(sampled).unwrap();
    assert_eq!(
        continued.span().span_context().span_id().to_string(),
        "00f067aa0ba902b7"
    );
    assert!(sampled_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").is_none());
    assert!(sampled_context("garbage").is_none());
    // A span outside any tracer has no context to give.
    assert_eq!(traceparent_of(&tracing::Span::none()), None);
}

/// A log writer the test reads back.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
    type Writer = Self;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn a_json_log_line_carries_its_fields_its_span_and_its_trace() {
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOn)
        .build();
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry()
        .with(json_logs(captured.clone()))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let trace_id = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("http.request", http.route = "/v1/x", request_id = "r-1");
        span.in_scope(|| tracing::warn!(status = 502, "Failed to forward a request."));
        span.context().span().span_context().trace_id().to_string()
    });

    let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["message"], "Failed to forward a request.");
    assert_eq!(line["status"], 502);
    assert_eq!(line["span"]["name"], "http.request");
    assert_eq!(line["span"]["http.route"], "/v1/x");
    assert_eq!(line["span"]["request_id"], "r-1");
    assert_eq!(line["openTelemetry"]["traceId"], trace_id.as_str());
    assert_ne!(trace_id, TraceId::INVALID.to_string());
}
