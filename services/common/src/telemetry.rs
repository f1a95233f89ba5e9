//! Tracing, structured logs and OpenTelemetry export, and W3C trace-context propagation.
//!
//! Every service calls [`init`] once. Spans are exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; spans get W3C ids either way, and the W3C `traceparent`/`tracestate` propagator is
//! installed either way, so trace context flows through HTTP ([`extract_http`],
//! [`inject_http`]) and Kafka headers ([`extract_kafka`], [`inject_kafka`]) even when this
//! process exports nothing.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, global};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{CommonConfig, LogFormat};

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` did not parse.
    #[error("failed to parse RUST_LOG: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built.
    #[error("failed to build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the tracer provider alive; dropping it flushes buffered spans.
#[must_use = "dropping the guard shuts telemetry down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("failed to flush spans on shutdown: {error}");
        }
    }
}

/// Installs the global subscriber (log format and filter from `config`) and, when an OTLP
/// endpoint is configured, a batch span exporter. Calling it again (tests) is harmless.
pub fn init(service_name: &str, config: &CommonConfig) -> Result<TelemetryGuard, TelemetryError> {
    global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::builder().parse(&config.rust_log)?;
    let fmt = match config.log_format {
        LogFormat::Json => json_logs(std::io::stdout).boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
    };

    // A tracer provider is always installed, so spans carry W3C ids that propagate to the
    // next hop even when this process exports nothing; the exporter is added only when an
    // OTLP endpoint is configured.
    let name = config
        .otel_service_name
        .as_deref()
        .unwrap_or(service_name)
        .to_owned();
    let ratio = config.otel_traces_sampler_arg.clamp(0.0, 1.0);
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(name.clone()).build());
    if let Some(endpoint) = &config.otel_exporter_otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!(
                "{}/v1/traces",
                endpoint.as_str().trim_end_matches('/')
            ))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_tracer_provider(provider.clone());
    // Per span, only what a trace viewer shows: no busy/idle timing (two clock reads on every
    // poll of an instrumented future), no thread name and id, and no OpenTelemetry context
    // made current on every entry (the propagation here reads a span's context through the
    // layer: `OpenTelemetrySpanExt::context`). Together a tenth of the gateway's instructions
    // per proxied request.
    let otel = tracing_opentelemetry::layer()
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_context_activation(false)
        .with_tracer(provider.tracer(name));

    // `try_init` fails only when a subscriber is already installed (several apps in one
    // test process); the first one stays in charge.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// The JSON log lines written to `writer`: the event's fields at the top level, the current
/// span's under `span`, and the trace's ids under `openTelemetry` (`traceId`, `spanId`), so a
/// log line leads to its trace.
///
/// `json-subscriber` rather than `tracing-subscriber`'s JSON format, which writes a span's
/// fields out as JSON when the span opens, through a map of `serde_json::Value`s, whether or
/// not anything is logged in it: 7.8k of the gateway's ~110k instructions per proxied request,
/// 4.3k with this layer (same lines, plus the trace's ids).
fn json_logs<S, W>(writer: W) -> json_subscriber::fmt::Layer<S, W>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    json_subscriber::fmt::layer()
        .with_writer(writer)
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_opentelemetry_ids(true)
}

/// The trace context carried by HTTP request headers (`traceparent`, `tracestate`).
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Writes the current span's trace context into outgoing HTTP headers (an empty
/// `tracestate` is left out: [`HttpTraceInjector`]).
pub fn inject_http(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HttpTraceInjector(headers)));
}

/// Makes `span` a child of the trace context carried by `headers`, if any.
pub fn set_parent_from_http(span: &tracing::Span, headers: &http::HeaderMap) {
    set_parent(span, extract_http(headers));
}

/// The trace context carried by Kafka message headers.
pub fn extract_kafka<H: Headers>(headers: Option<&H>) -> Context {
    match headers {
        Some(headers) => {
            global::get_text_map_propagator(|p| p.extract(&KafkaHeaderExtractor(headers)))
        }
        None => Context::new(),
    }
}

/// Adds the current span's trace context to outgoing Kafka headers.
pub fn inject_kafka(headers: OwnedHeaders) -> OwnedHeaders {
    let cx = tracing::Span::current().context();
    let mut injector = KafkaHeaderInjector(Some(headers));
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut injector));
    injector.0.unwrap_or_default()
}

/// Makes `span` a child of the trace context carried by Kafka `headers`, if any.
pub fn set_parent_from_kafka<H: Headers>(span: &tracing::Span, headers: Option<&H>) {
    set_parent(span, extract_kafka(headers));
}

/// The W3C `traceparent` of `span`'s context, for carriers that are not HTTP or Kafka headers
/// (room publications); `None` when the span has no valid context (disabled, or no tracer).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut fields = std::collections::HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    fields.remove("traceparent")
}

/// The remote context a `traceparent` value names (an empty context when it does not parse).
pub fn context_from_traceparent(traceparent: &str) -> Context {
    let fields =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    global::get_text_map_propagator(|p| p.extract(&fields))
}

/// The context a `traceparent` value names, when it is valid and sampled (a span continuing it
/// would be exported); parsed once, for [`set_parent`].
pub fn sampled_context(traceparent: &str) -> Option<Context> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = context_from_traceparent(traceparent);
    let sampled = {
        let span = cx.span();
        let context = span.span_context();
        context.is_valid() && context.is_sampled()
    };
    sampled.then_some(cx)
}

/// Makes `span` a child of `cx`.
pub fn set_parent(span: &tracing::Span, cx: Context) {
    // Fails only when the span is disabled (filtered out), in which case there is nothing
    // to link.
    let _ = span.set_parent(cx);
}

/// Reads W3C fields from rdkafka headers (header values are bytes).
struct KafkaHeaderExtractor<'a, H>(&'a H);

impl<H: Headers> Extractor for KafkaHeaderExtractor<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// Writes W3C fields into an HTTP header map, on the gateway's path for every proxied
/// request: the two W3C names are constants (not parsed again per request), a value keeps
/// the propagator's string (no copy), and an empty `tracestate` is not sent (W3C: none means
/// empty) but removes one the map carried, which belonged to another trace.
struct HttpTraceInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HttpTraceInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" if value.is_empty() => {
                self.0.remove(TRACESTATE);
                return;
            }
            "tracestate" => TRACESTATE,
            other => match http::HeaderName::from_bytes(other.as_bytes()) {
                Ok(name) => name,
                Err(_) => return,
            },
        };
        if let Ok(value) = http::HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}

/// Appends W3C fields to rdkafka's owned headers (whose `insert` consumes `self`); an empty
/// `tracestate` is left out, as over HTTP.
struct KafkaHeaderInjector(Option<OwnedHeaders>);

impl Injector for KafkaHeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() && key == "tracestate" {
            return;
        }
        let headers = self.0.take().unwrap_or_default();
        self.0 = Some(headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        }));
    }
}

#[cfg(test)]
mod tests;
