//! The HTTP pieces every service shares: the operational routes, request tracing that joins
//! the caller's W3C trace, request metrics, and a bounded server with graceful shutdown.
//!
//! The server bounds what one client can hold: the time to send a request's headers (which is
//! also how long an idle keep-alive connection stays open), the wait for each part of a request
//! body, and the requests handled at once, beyond which requests are shed with 503 and
//! `Retry-After` instead of queueing (the operational routes are exempt, so probes and scrapes
//! still answer under load).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::CommonConfig;
use crate::health::Readiness;
use crate::shutdown::CancellationToken;
use crate::telemetry;

mod layers;

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
    /// What one client can hold of the server.
    pub limits: ServerLimits,
    /// Where `/ready` and `/metrics` are served instead of the main port (`OPS_PORT`).
    pub ops_addr: Option<SocketAddr>,
}

/// The server's bounds (`HTTP_*`, see [`CommonConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Time to send a request's headers; also the idle keep-alive timeout.
    pub header_read_timeout: Duration,
    /// Longest wait for the next part of a request body.
    pub body_timeout: Duration,
    /// Requests handled at once before shedding.
    pub max_concurrent_requests: usize,
}

impl ServerLimits {
    /// The limits `common` configures.
    pub fn from_config(common: &CommonConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(common.http_header_read_timeout_ms.max(1)),
            body_timeout: Duration::from_millis(common.http_body_timeout_ms.max(1)),
            max_concurrent_requests: common.http_max_concurrent_requests.max(1),
        }
    }
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
            limits: ServerLimits::from_config(common),
            ops_addr: common.ops_addr(),
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

/// The operational routes of the main port: `/health`, and `/ready` and `/metrics` unless
/// they have a port of their own (`OPS_PORT`, served by [`serve`]).
pub fn ops_router(ops: &Ops) -> Router {
    if ops.ops_addr.is_some() {
        Router::new().route("/health", get(health))
    } else {
        all_ops_routes(ops)
    }
}

/// `/health`, `/ready` and `/metrics`.
fn all_ops_routes(ops: &Ops) -> Router {
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
        .layer(layers::RequestMetricsLayer::new(service))
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

/// The operational routes, exempt from shedding.
fn is_ops_path(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// Adds the request-level bounds to `router`: shedding beyond the concurrency limit and the
/// body timeout.
fn bounded(router: Router, service: &'static str, limits: ServerLimits) -> Router {
    router
        .layer(layers::ShedLayer::new(
            service,
            limits.max_concurrent_requests,
        ))
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
}

/// Serves `router` on `listener` (and the operational routes on the ops port, when there is
/// one) until `shutdown` fires; then reports not-ready, stops accepting, and lets in-flight
/// requests finish within the grace period. The ops port answers until the drain is over.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    ops: &Ops,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (readiness, grace, limits) = (ops.readiness.clone(), ops.grace, ops.limits);
    let ops_server = match ops.ops_addr {
        Some(addr) => {
            let ops_listener = TcpListener::bind(addr).await?;
            let addr = ops_listener.local_addr()?;
            tracing::info!(service = readiness.service(), %addr, "Serving /ready and /metrics on the ops port.");
            let stop = CancellationToken::new();
            let app = all_ops_routes(ops);
            let server = tokio::spawn(accept(ops_listener, app, limits, None, stop.clone()));
            Some((stop, server))
        }
        None => None,
    };
    let addr = listener.local_addr()?;
    tracing::info!(service = readiness.service(), %addr, "Listening.");
    // `with_state(())` turns every handler into its route once; a stateless handler left
    // boxed would be converted (cloned and layered) again on every request.
    let app = bounded(router, readiness.service(), limits).with_state(());
    let connections = accept(listener, app, limits, None, shutdown).await;
    readiness.start_draining();
    tokio::select! {
        () = connections.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_seconds = grace.as_secs(), "In-flight requests outlived the grace period; stopping.");
        }
    }
    if let Some((stop, server)) = ops_server {
        stop.cancel();
        // Scrapes and probes are short; they are not waited for.
        server.abort();
    }
    Ok(())
}

/// Serves `router` over TLS on `listener` until `shutdown` fires, bounded as [`serve`] bounds
/// its port (the TLS handshake counts against the header-read timeout); then lets in-flight
/// requests finish within `grace`. The certificate is whatever `tls` presents on each
/// handshake, so a resolver that swaps it rotates the certificate without a restart.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: TlsAcceptor,
    service: &'static str,
    limits: ServerLimits,
    grace: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(service, %addr, "Listening (TLS).");
    let app = bounded(router, service, limits).with_state(());
    let connections = accept(listener, app, limits, Some(tls), shutdown).await;
    if tokio::time::timeout(grace, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            service,
            grace_seconds = grace.as_secs(),
            "In-flight requests outlived the grace period; stopping."
        );
    }
    Ok(())
}

/// Accepts connections on `listener` (and completes their TLS handshake, with `tls`) and serves
/// `app` on each until `stop` fires; returns the connections still open, to drain.
async fn accept(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
) -> GracefulShutdown {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let connections = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // the listener itself is fine.
                    tracing::warn!(%error, "Failed to accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Nagle's algorithm would hold a small write (a WebSocket frame, a streamed chunk)
        // back until the client's delayed ACK of the previous one: up to 40 ms of tail latency.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "Failed to set TCP_NODELAY.");
        }
        // Handlers that need the peer address (the gateway's forwarding fields and `ip` rate
        // limits) read `ConnectInfo<SocketAddr>`.
        let service =
            app.clone()
                .map_request(move |mut request: Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(ConnectInfo::<SocketAddr>(peer));
                    request.map(axum::body::Body::new)
                });
        let service = TowerToHyperService::new(service);
        let Some(tls) = &tls else {
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let connection = connections.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %error, "Connection ended with an error.");
                }
            });
            continue;
        };
        // The handshake runs on the connection's task, bounded like a request's headers, so a
        // slow client holds neither the accept loop nor more than its own task.
        let (builder, watcher, tls) = (builder.clone(), connections.watcher(), tls.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(limits.header_read_timeout, tls.accept(stream));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "TLS handshake failed.");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out.");
                    return;
                }
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %error, "Connection ended with an error.");
            }
        });
    }
    connections
}

/// The request body's declared length (`Content-Length`), if it has a valid one.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How much of a refused request's body [`linger`] reads, at most.
pub const LINGER_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// How long [`linger`] reads a refused request's body, at most.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// Reads and discards the rest of a request body the server refused (413) in the background,
/// at most [`LINGER_MAX_BYTES`] for at most [`LINGER_TIME`], while the response goes out.
///
/// A server that closes a connection with unread request bytes makes the kernel answer with a
/// reset, and a client (or a proxy in between) that receives the reset before it read the
/// response loses the response: it sees "connection reset" instead of the 413. Reading the
/// rest first lets the connection end with an orderly close (nginx's lingering close).
pub fn linger(body: axum::body::Body) {
    use futures::StreamExt as _;
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        let mut read = 0_u64;
        let drained = tokio::time::timeout(LINGER_TIME, async {
            while let Some(Ok(chunk)) = data.next().await {
                read += chunk.len() as u64;
                if read > LINGER_MAX_BYTES {
                    break;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!(
                read,
                "Stopped reading a refused request's body after the linger time."
            );
        }
    });
}

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// The client address of a request: the TCP peer, or with `hops` trusted proxies in front,
/// the `X-Forwarded-For` entry the outermost trusted proxy added (entries a client wrote
/// itself come before it and are never used).
pub fn client_ip(
    peer: std::net::IpAddr,
    headers: &http::HeaderMap,
    hops: usize,
) -> std::net::IpAddr {
    if hops == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    entries
        .len()
        .checked_sub(hops)
        .and_then(|index| entries[index].parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use http::{HeaderMap, HeaderValue};

    use super::*;

    #[test]
    fn only_standard_methods_become_labels() {
        assert_eq!(layers::method_label(&http::Method::PATCH), "PATCH");
        let brew = http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(layers::method_label(&brew), "other");
    }

    #[test]
    fn the_client_ip_is_the_peer_unless_proxies_are_trusted() {
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 203.0.113.7"),
        );
        assert_eq!(client_ip(peer, &headers, 0), peer);
        assert_eq!(client_ip(peer, &headers, 1).to_string(), "203.0.113.7");
        assert_eq!(client_ip(peer, &headers, 2).to_string(), "1.1.1.1");
        assert_eq!(client_ip(peer, &headers, 3), peer);
        assert_eq!(client_ip(peer, &HeaderMap::new(), 1), peer);
    }
}
