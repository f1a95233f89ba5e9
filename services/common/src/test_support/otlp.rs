//! An in-process OTLP/HTTP trace receiver: services under test export their spans to it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT=<receiver.endpoint()>`), and the test asserts on the spans it
//! decoded — their trace ids, parents, names and services — instead of on headers alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One span as a test sees it (ids in lower-case hex, the W3C text form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, or `None` for a root span.
    pub parent_span_id: Option<String>,
    /// String, integer and boolean attributes, as text.
    pub attributes: HashMap<String, String>,
}

/// Collects every span exported to it until dropped.
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    endpoint: String,
    stop: CancellationToken,
}

impl OtlpReceiver {
    /// Listens on `127.0.0.1:<free port>` for `POST /v1/traces` (protobuf).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(spans.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            spans,
            endpoint,
            stop,
        }
    }

    /// The base URL to give as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn export(
    State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(HeaderMap, Vec<u8>), (StatusCode, String)> {
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-protobuf"));
    if !protobuf {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only application/x-protobuf".to_owned(),
        ));
    }
    let request = ExportTraceServiceRequest::decode(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let resource_attributes = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource_attributes
            .get("service.name")
            .cloned()
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: trace_id(&span.trace_id),
                    span_id: span_id(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| span_id(&span.parent_span_id)),
                    attributes: attributes(&span.attributes),
                    name: span.name,
                });
            }
        }
    }
    spans
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(received);
    let mut reply = HeaderMap::new();
    reply.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok((reply, ExportTraceServiceResponse::default().encode_to_vec()))
}

fn attributes(
    list: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> HashMap<String, String> {
    list.iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

fn trace_id(bytes: &[u8]) -> String {
    TraceId::from_bytes(bytes.try_into().unwrap_or_default()).to_string()
}

fn span_id(bytes: &[u8]) -> String {
    SpanId::from_bytes(bytes.try_into().unwrap_or_default()).to_string()
}
