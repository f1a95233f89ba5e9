//! The two per-request layers every service's routes run through, as plain tower services:
//! request metrics ([`RequestMetricsLayer`]) and shedding beyond the concurrency limit
//! ([`ShedLayer`]). Written as `axum::middleware::from_fn` they cost, per request and layer,
//! a clone of the inner service, two boxed futures and a boxed service; here each is a
//! struct around the inner future.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use futures::future::Either;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::metrics::{
    HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_SHED_TOTAL, HTTP_REQUESTS_TOTAL, RequestHandles,
};
use crate::problem::{ProblemType, retry_later};

/// Counts every request and times it to its response head, labelled with the service, the
/// method ([`method_label`]), the route template (never the raw path, which would explode
/// cardinality; `unmatched` outside the routes) and the status.
#[derive(Clone)]
pub(super) struct RequestMetricsLayer {
    service: &'static str,
    handles: Arc<RequestHandles>,
}

impl RequestMetricsLayer {
    pub(super) fn new(service: &'static str) -> Self {
        Self {
            service,
            handles: Arc::default(),
        }
    }
}

/// A route wrapped in one of this module's layers: the route, and the layer's shared state.
#[derive(Clone)]
pub(super) struct Layered<L, S> {
    inner: S,
    layer: L,
}

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = Layered<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        let layer = self.clone();
        Layered { inner, layer }
    }
}

impl<S> Service<Request> for Layered<RequestMetricsLayer, S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.method());
        let route = request.extensions().get::<MatchedPath>().cloned();
        MetricsFuture {
            inner: self.inner.call(request),
            started,
            method,
            route,
            layer: self.layer.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of a [`RequestMetricsLayer`]'s route: records once the response head is ready.
    pub(super) struct MetricsFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        method: &'static str,
        route: Option<MatchedPath>,
        layer: RequestMetricsLayer,
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let (service, method) = (this.layer.service, *this.method);
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let status = response.status();
        this.layer.handles.record(
            (method, status.as_u16(), route),
            this.started.elapsed().as_secs_f64(),
            || {
                let labels = [
                    ("service", metrics::SharedString::const_str(service)),
                    ("method", metrics::SharedString::const_str(method)),
                    ("route", route.to_owned().into()),
                    ("status", status.as_str().to_owned().into()),
                ];
                (
                    metrics::counter!(HTTP_REQUESTS_TOTAL, &labels),
                    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels),
                )
            },
        );
        Poll::Ready(Ok(response))
    }
}

/// The `method` label: a standard method by name, any other token `other`, so that clients
/// cannot create metric series at will (a method is any token a client sends).
pub(super) fn method_label(method: &http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// Sheds requests beyond `max` at once with 503 and `Retry-After` instead of queueing them;
/// the operational routes are exempt, so probes and scrapes still answer under load.
#[derive(Clone)]
pub(super) struct ShedLayer {
    service: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub(super) fn new(service: &'static str, max: usize) -> Self {
        Self {
            service,
            max,
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Layered<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        let layer = self.clone();
        Layered { inner, layer }
    }
}

impl<S> Service<Request> for Layered<ShedLayer, S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Admitted<S::Future>, Ready<Result<Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let permit = if super::is_ops_path(request.uri().path()) {
            None
        } else if let Ok(permit) = self.layer.permits.clone().try_acquire_owned() {
            Some(permit)
        } else {
            let service = self.layer.service;
            metrics::counter!(HTTP_REQUESTS_SHED_TOTAL, "service" => service).increment(1);
            return Either::Right(std::future::ready(Ok(retry_later(
                ProblemType::CapacityExceeded,
                format!(
                    "this node is handling its limit of {} requests; retry later",
                    self.layer.max
                ),
            ))));
        };
        Either::Left(Admitted {
            inner: self.inner.call(request),
            _permit: permit,
        })
    }
}

pin_project_lite::pin_project! {
    /// An admitted request's response future: the route's, holding the request's permit
    /// (none on the operational routes) until the response head is ready.
    pub(super) struct Admitted<F> {
        #[pin]
        inner: F,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for Admitted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
