//! The HTTP pieces every service shares: the operational routes, request tracing that joins
//! the caller's W3C trace, request metrics, and serving with graceful shutdown.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::CommonConfig;
use crate::health::Readiness;
use crate::metrics::{HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_TOTAL};
use crate::shutdown::CancellationToken;
use crate::telemetry;

/// The `X-Request-Id` header: taken from the caller or generated, echoed in the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every service's operational routes need: readiness, the metrics handle and the
/// drain grace period.
#[derive(Clone)]
pub struct Ops {
    /// Dependency checks behind `/ready`.
    pub readiness: Readiness,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// How long in-flight requests may take after a shutdown signal.
    pub grace: Duration,
}

impl Ops {
    /// Operational state for `service` with no dependency checks yet.
    pub fn new(service: &'static str, common: &CommonConfig) -> Self {
        let metrics = crate::metrics::install();
        crate::metrics::record_build_info(service);
        Self {
            readiness: Readiness::new(service, common.readiness_timeout()),
            metrics,
            grace: common.shutdown_grace(),
        }
    }

    /// Adds a required dependency check (see [`Readiness::with`]).
    #[must_use]
    pub fn with(mut self, check: impl crate::health::Check + 'static) -> Self {
        self.readiness = self.readiness.with(check);
        self
    }

    /// Adds an optional dependency check (see [`Readiness::with_optional`]).
    #[must_use]
    pub fn with_optional(mut self, check: impl crate::health::Check + 'static) -> Self {
        self.readiness = self.readiness.with_optional(check);
        self
    }
}

/// `/health`, `/ready` and `/metrics`.
pub fn ops_router(ops: &Ops) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(ops.clone())
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(ops): State<Ops>) -> Response {
    let report = ops.readiness.report().await;
    let status = if report.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

/// Wraps a service's routes with the shared layers: request ids, a tracing span per request
/// (child of the caller's `traceparent`), and request metrics labelled with the route
/// template (never the raw path, which would explode cardinality).
pub fn instrument(router: Router, service: &'static str) -> Router {
    router
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            record_metrics(service, req, next)
        }))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or(req.uri().path(), MatchedPath::as_str);
            let request_id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let span = tracing::info_span!(
                "http.request",
                http.request.method = %req.method(),
                http.route = route,
                request_id,
            );
            telemetry::set_parent_from_http(&span, req.headers());
            span
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

async fn record_metrics(service: &'static str, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let labels = [
        ("service", service.to_owned()),
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Serves `router` on `listener` until `shutdown` fires; then reports not-ready, stops
/// accepting, and lets in-flight requests finish within the grace period.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    ops: &Ops,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (readiness, grace) = (ops.readiness.clone(), ops.grace);
    let addr = listener.local_addr()?;
    tracing::info!(service = readiness.service(), %addr, "Listening.");
    let drained = shutdown.clone();
    // Handlers that need the peer address (the gateway's forwarding fields and `ip` rate
    // limits) read `ConnectInfo<SocketAddr>`; for the others it costs nothing.
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Nagle's algorithm would hold a small write (a WebSocket frame, a streamed chunk) back
    // until the client's delayed ACK of the previous one: up to 40 ms of tail latency.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "Failed to set TCP_NODELAY.");
        }
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            drained.cancelled().await;
            readiness.start_draining();
        })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_seconds = grace.as_secs(), "In-flight requests outlived the grace period; stopping.");
            Ok(())
        }
    }
}
