//! Forwarding requests upstream: a pooled HTTP/1.1 client, header hygiene and WebSocket
//! tunnels.
//!
//! For every forwarded request the gateway
//! - removes hop-by-hop fields (RFC 9110 §7.6.1: those named in `Connection`, plus
//!   `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`,
//!   `Trailer`, `Proxy-Authorization`, `Proxy-Authenticate`) in both directions;
//! - appends the caller to `Forwarded` (RFC 7239) and `X-Forwarded-For`, and sets
//!   `X-Forwarded-Proto`/`X-Forwarded-Host`;
//! - keeps `X-Request-Id` (set by the request-id layer: the caller's or a new UUID);
//! - replaces `traceparent`/`tracestate` with the gateway span's context (a child of the
//!   caller's), so the upstream's spans nest under the gateway's;
//! - bounds the time to connect (`GATEWAY_CONNECT_TIMEOUT_MS`) and to the response headers
//!   (`GATEWAY_REQUEST_TIMEOUT_MS`), and the request body (`GATEWAY_MAX_BODY_BYTES`, 413).
//!
//! A WebSocket upgrade is forwarded with its `Upgrade` handshake; on `101` both upgraded
//! connections are joined with `copy_bidirectional`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri, header};
use axum::response::IntoResponse;
use common::metrics::{
    GATEWAY_PROXIED_REQUESTS_TOTAL, GATEWAY_UPSTREAM_DURATION_SECONDS, RequestHandles,
};
use common::problem::{Problem, ProblemType};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use url::Url;

/// `X-Forwarded-For`.
pub use common::http::X_FORWARDED_FOR;
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `Forwarded` (RFC 7239).
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// `Keep-Alive`.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection` (non-standard, still sent by some clients).
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop fields removed in both directions, besides those named in `Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    KEEP_ALIVE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Client settings.
#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time from sending a request to receiving the response headers.
    pub request_timeout: Duration,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Idle pooled connections per upstream host.
    pub pool_max_idle_per_host: usize,
}

/// The pooled upstream client. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    settings: ProxySettings,
    service: &'static str,
    /// The per-(route, status) metric handles.
    handles: Arc<RequestHandles>,
}

/// The caller, as seen by the gateway.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The TCP peer.
    pub peer: SocketAddr,
}

/// Why a request could not be forwarded (each maps to a problem response).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The body is over the limit.
    #[error("the request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    /// The body could not be read from the client.
    #[error("failed to read the request body: {0}")]
    Body(String),
    /// The upstream did not answer in time.
    #[error("the upstream did not answer within {0} ms")]
    Timeout(u128),
    /// The upstream could not be reached or broke the connection.
    #[error("failed to reach the upstream: {0}")]
    Upstream(#[from] hyper_util::client::legacy::Error),
    /// The upstream URI could not be built.
    #[error("failed to build the upstream URI: {0}")]
    Uri(#[from] http::Error),
}

impl ProxyError {
    /// The problem response for this error; upstream details stay in the logs.
    pub fn into_problem(self) -> Problem {
        match self {
            Self::BodyTooLarge(limit) => {
                Problem::new(ProblemType::PayloadTooLarge, StatusCode::PAYLOAD_TOO_LARGE)
                    .detail(format!("the request body must be at most {limit} bytes"))
            }
            Self::Body(_) => Problem::new(ProblemType::ValidationFailed, StatusCode::BAD_REQUEST)
                .detail("the request body could not be read"),
            Self::Timeout(_) => Problem::new(
                ProblemType::DependencyUnavailable,
                StatusCode::GATEWAY_TIMEOUT,
            )
            .detail("the upstream service did not answer in time"),
            Self::Upstream(_) | Self::Uri(_) => {
                Problem::new(ProblemType::DependencyUnavailable, StatusCode::BAD_GATEWAY)
                    .detail("the upstream service is unavailable")
            }
        }
    }
}

impl Proxy {
    /// A pooled client with `settings`.
    pub fn new(service: &'static str, settings: ProxySettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        // Idle connections are dropped before the upstream's idle timeout closes them
        // (`HTTP_HEADER_READ_TIMEOUT_MS`, 30 s by default), so a request never races a close.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .build(connector);
        Self {
            client,
            settings,
            service,
            handles: Arc::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// Forwards `request` to `upstream` (base URL + the request's path and query) and returns
    /// the upstream's response, or a problem response. `route` labels the metrics.
    pub async fn forward(
        &self,
        route: &str,
        upstream: &Url,
        caller: &Caller,
        request: Request,
    ) -> axum::response::Response {
        let started = Instant::now();
        let response = match self.send(upstream, caller, request).await {
            Ok(response) => response,
            Err(error) => {
                self.log_failure(route, &error);
                error.into_problem().into_response()
            }
        };
        self.record(route, response.status(), started);
        response
    }

    async fn send(
        &self,
        upstream: &Url,
        caller: &Caller,
        request: Request,
    ) -> Result<axum::response::Response, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let body = self.limit_body(&parts.headers, body).await?;
        parts.uri = upstream_uri(upstream, &parts.uri)?;
        let host = parts.headers.remove(header::HOST);
        prepare_request_headers(&mut parts.headers, caller, host.as_ref());
        let request = Request::from_parts(parts, body);
        let response = self.call(request).await?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    async fn call(&self, request: Request) -> Result<Response<hyper::body::Incoming>, ProxyError> {
        match tokio::time::timeout(self.settings.request_timeout, self.client.request(request))
            .await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(ProxyError::Timeout(
                self.settings.request_timeout.as_millis(),
            )),
        }
    }

    /// A body of known length within the limit streams through; one over it is refused
    /// before anything is sent; one of unknown length (chunked) is buffered up to the limit.
    /// The rest of a refused body is read in the background ([`common::http::linger`]), so the
    /// client gets the 413 instead of a reset.
    async fn limit_body(&self, headers: &HeaderMap, body: Body) -> Result<Body, ProxyError> {
        let limit = self.settings.max_body_bytes;
        if let Some(length) = common::http::declared_length(headers) {
            return if length > limit as u64 {
                common::http::linger(body);
                Err(ProxyError::BodyTooLarge(limit))
            } else {
                Ok(body)
            };
        }
        if axum::body::HttpBody::is_end_stream(&body) {
            return Ok(body);
        }
        let mut body = body;
        let mut buffered = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ProxyError::Body(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buffered.len() + data.len() > limit {
                common::http::linger(body);
                return Err(ProxyError::BodyTooLarge(limit));
            }
            buffered.extend_from_slice(&data);
        }
        Ok(Body::from(buffered.freeze()))
    }

    /// Forwards a WebSocket upgrade and, on `101 Switching Protocols`, tunnels the two
    /// upgraded connections until either side closes.
    pub async fn upgrade(
        &self,
        route: &str,
        upstream: &Url,
        caller: &Caller,
        mut request: Request,
    ) -> axum::response::Response {
        let started = Instant::now();
        let Some(protocol) = upgrade_protocol(request.headers()) else {
            return self.forward(route, upstream, caller, request).await;
        };
        let client_upgrade = hyper::upgrade::on(&mut request);
        let (mut parts, _) = request.into_parts();
        let uri = match upstream_uri(upstream, &parts.uri) {
            Ok(uri) => uri,
            Err(error) => return ProxyError::from(error).into_problem().into_response(),
        };
        parts.uri = uri;
        let host = parts.headers.remove(header::HOST);
        prepare_request_headers(&mut parts.headers, caller, host.as_ref());
        restore_upgrade(&mut parts.headers, &protocol);
        let mut response = match self.call(Request::from_parts(parts, Body::empty())).await {
            Ok(response) => response,
            Err(error) => {
                self.log_failure(route, &error);
                let response = error.into_problem().into_response();
                self.record(route, response.status(), started);
                return response;
            }
        };
        self.record(route, response.status(), started);
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            return Response::from_parts(parts, Body::new(body));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let route_name = route.to_owned();
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, route = route_name, "WebSocket upgrade did not complete.");
                    return;
                }
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%error, route = route_name, "WebSocket tunnel closed with an error.");
            }
        });
        let (mut parts, _) = response.into_parts();
        let upstream_protocol = upgrade_protocol(&parts.headers).unwrap_or(protocol);
        strip_hop_by_hop(&mut parts.headers);
        restore_upgrade(&mut parts.headers, &upstream_protocol);
        Response::from_parts(parts, Body::empty())
    }

    fn log_failure(&self, route: &str, error: &ProxyError) {
        match error {
            ProxyError::BodyTooLarge(_) | ProxyError::Body(_) => {}
            _ => tracing::warn!(route, %error, "Failed to forward a request."),
        }
    }

    fn record(&self, route: &str, status: StatusCode, started: Instant) {
        let service = self.service;
        self.handles.record(
            ("", status.as_u16(), route),
            started.elapsed().as_secs_f64(),
            || {
                (
                    metrics::counter!(GATEWAY_PROXIED_REQUESTS_TOTAL, "service" => service, "route" => route.to_owned(), "status" => status.as_str().to_owned()),
                    metrics::histogram!(GATEWAY_UPSTREAM_DURATION_SECONDS, "service" => service, "route" => route.to_owned()),
                )
            },
        );
    }
}

/// `upstream` (scheme, authority, path prefix) + the request's path and query.
pub fn upstream_uri(upstream: &Url, original: &Uri) -> Result<Uri, http::Error> {
    let base = upstream.path().trim_end_matches('/');
    let path_and_query = original.path_and_query().map_or("/", |pq| pq.as_str());
    let authority = match upstream.port() {
        Some(port) => format!("{}:{port}", upstream.host_str().unwrap_or_default()),
        None => upstream.host_str().unwrap_or_default().to_owned(),
    };
    Uri::builder()
        .scheme(upstream.scheme())
        .authority(authority)
        .path_and_query(format!("{base}{path_and_query}"))
        .build()
}

/// The `Upgrade` protocol of a request that asks for one (`Connection: upgrade`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if wants_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

fn restore_upgrade(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol.clone());
}

/// Removes the hop-by-hop fields (RFC 9110 §7.6.1), including every field that `Connection`
/// names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    // Only the fields present are removed: a removal hashes its name, present or not, and
    // most messages carry one hop-by-hop field or none (a scan of their few names is cheaper).
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name) || named.contains(name))
        .cloned()
        .collect();
    for name in &present {
        headers.remove(name);
    }
}

/// Hop-by-hop removal, forwarding fields and the gateway's trace context.
fn prepare_request_headers(headers: &mut HeaderMap, caller: &Caller, host: Option<&HeaderValue>) {
    strip_hop_by_hop(headers);
    let ip = caller.peer.ip();
    // Formatted once (an address's `Display` is most of this function's cost).
    let address = ip.to_string();
    append_list(headers, X_FORWARDED_FOR, &address);
    // RFC 7239: IPv6 addresses are bracketed and the value quoted.
    let mut forwarded = if ip.is_ipv6() {
        format!("for=\"[{address}]\";proto=http")
    } else {
        format!("for={address};proto=http")
    };
    if let Some(host) = host.and_then(|h| h.to_str().ok())
        && host
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        forwarded.push_str(";host=\"");
        forwarded.push_str(host);
        forwarded.push('"');
    }
    append_list(headers, FORWARDED, &forwarded);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    common::telemetry::inject_http(headers);
}

/// Appends `value` to a comma-separated list field (one combined line).
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let combined = {
        let existing: Vec<&str> = headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if existing.is_empty() {
            value.to_owned()
        } else {
            format!("{}, {value}", existing.join(", "))
        }
    };
    // Takes the string's buffer: no copy.
    if let Ok(value) = HeaderValue::try_from(combined) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_those_named_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x-checksum"),
            ("authorization", "Bearer t"),
            ("x-request-id", "r1"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-request-id"]);
    }

    #[test]
    fn forwarding_fields_are_appended() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=203.0.113.9"));
        let caller = Caller {
            peer: "[2001:db8::1]:5000".parse().unwrap(),
        };
        prepare_request_headers(
            &mut headers,
            &caller,
            Some(&HeaderValue::from_static("api.example:8080")),
        );
        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.9, 2001:db8::1");
        assert_eq!(
            headers[FORWARDED],
            "for=203.0.113.9, for=\"[2001:db8::1]\";proto=http;host=\"api.example:8080\""
        );
        assert_eq!(headers[X_FORWARDED_HOST], "api.example:8080");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
    }

    #[test]
    fn the_upstream_uri_keeps_the_path_prefix_and_the_query() {
        let upstream = Url::parse("http://svc:8082/base/").unwrap();
        let uri: Uri = "/v1/commands/abc?x=1&y=%20".parse().unwrap();
        assert_eq!(
            upstream_uri(&upstream, &uri).unwrap().to_string(),
            "http://svc:8082/base/v1/commands/abc?x=1&y=%20"
        );
        let bare = Url::parse("http://svc").unwrap();
        assert_eq!(
            upstream_uri(&bare, &"/ws".parse().unwrap())
                .unwrap()
                .to_string(),
            "http://svc/ws"
        );
    }

    #[test]
    fn an_upgrade_is_recognised_only_with_connection_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_protocol(&headers).is_none());
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_protocol(&headers).unwrap(), "websocket");
    }
}
