//! The API gateway (port 8080): routes requests to the services, authenticates JWTs and
//! enforces rate limits shared by all replicas through Redis.
//!
//! Per request, in order: the shared HTTP layers (`X-Request-Id`, a span continuing the
//! caller's `traceparent`, request metrics), the route's token check (`common::auth`), the
//! rate-limit check (one Redis round trip for every applicable policy), then the route's
//! handler: forward upstream, serve a document from the read model, or tunnel a WebSocket.
//!
//! # Layout
//! - [`routes`]: the route table (`GATEWAY_ROUTES` / `GATEWAY_ROUTES_FILE`), validated.
//! - [`identity`]: bearer tokens → [`Identity`](identity::Identity); 401 challenges.
//! - [`ratelimit`]: GCRA in one Lua script, local denial cache, IETF `RateLimit` headers.
//! - [`proxy`]: the pooled upstream client, header hygiene, WebSocket tunnels.
//! - [`documents`]: `GET /v1/documents/{collection}/{id}` from Redis with write-model fallback.
//! - this file: [`Config`], [`AppState`], [`router`], [`run`] and the [`Service`] impl.

pub mod documents;
pub mod identity;
pub mod proxy;
pub mod ratelimit;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use common::access::Grants;
use common::auth::{AuthConfig, Verifier};
use common::config::{CommonConfig, ConfigError, RedisConfig, Vars};
use common::health::Check;
use common::http::Ops;
use common::problem::{Problem, ProblemType};
use common::redis::{Redis, RedisError};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::net::TcpListener;
use url::Url;

use crate::identity::{Identity, X_CLIENT_ID};
use crate::proxy::{Caller, Proxy, ProxySettings};
use crate::ratelimit::{Decision, FailMode, Policy, PolicySpec, RateLimiter, Subjects};
use crate::routes::{AuthMode, Route, RouteKind, RouteSpec};

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "api-gateway";

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// Rate-limit state and the document read model.
    pub redis: RedisConfig,
    /// JWT verification (`JWT_*`).
    pub auth: AuthConfig,
    /// The gateway's own settings (`GATEWAY_*`).
    pub gateway: GatewayConfig,
    /// The validated route table.
    pub routes: Vec<Route>,
    /// The validated rate-limit policies.
    pub policies: Vec<Policy>,
}

/// The `GATEWAY_*` variables.
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayConfig {
    /// `GATEWAY_COMMAND_SERVICE_URL`: the `command-service` upstream. Default
    /// `http://127.0.0.1:8082`.
    #[serde(default = "defaults::command_service_url")]
    pub gateway_command_service_url: Url,
    /// `GATEWAY_HUB_URL`: the `hub` upstream. Default `http://127.0.0.1:8085`.
    #[serde(default = "defaults::hub_url")]
    pub gateway_hub_url: Url,
    /// `GATEWAY_ROUTES`: the route table as a JSON array (see [`routes`]). Default: the
    /// built-in table.
    pub gateway_routes: Option<String>,
    /// `GATEWAY_ROUTES_FILE`: a file holding the route table (exclusive with
    /// `GATEWAY_ROUTES`).
    pub gateway_routes_file: Option<PathBuf>,
    /// `GATEWAY_RATE_LIMITS`: JSON array of policies
    /// `{name, key: user|client|ip|route, rate, period: Second|Minute|Hour, burst?, routes?}`.
    /// Default none (no rate limiting).
    pub gateway_rate_limits: Option<String>,
    /// `GATEWAY_RATE_LIMIT_FAIL_MODE`: `open` (default: allow when Redis cannot answer) or
    /// `closed` (503).
    #[serde(default)]
    pub gateway_rate_limit_fail_mode: FailMode,
    /// `GATEWAY_RATE_LIMIT_TIMEOUT_MS`: bound on one rate-limit check. Default 100.
    #[serde(default = "defaults::rate_limit_timeout_ms")]
    pub gateway_rate_limit_timeout_ms: u64,
    /// `GATEWAY_CONNECT_TIMEOUT_MS`: upstream TCP connect timeout. Default 1000.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub gateway_connect_timeout_ms: u64,
    /// `GATEWAY_REQUEST_TIMEOUT_MS`: upstream time to response headers (504 after). Default
    /// 30000.
    #[serde(default = "defaults::request_timeout_ms")]
    pub gateway_request_timeout_ms: u64,
    /// `GATEWAY_MAX_BODY_BYTES`: request body limit (413 above). Default 1048576.
    #[serde(default = "defaults::max_body_bytes")]
    pub gateway_max_body_bytes: usize,
    /// `GATEWAY_POOL_MAX_IDLE_PER_HOST`: idle upstream connections kept per host. Default 512.
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pub gateway_pool_max_idle_per_host: usize,
    /// `GATEWAY_TRUSTED_PROXY_HOPS`: proxies in front of the gateway that append to
    /// `X-Forwarded-For` (an ingress: 1). The client address for `ip` rate limits is the
    /// entry they added; 0 (default) uses the TCP peer.
    #[serde(default)]
    pub gateway_trusted_proxy_hops: usize,
    /// `GATEWAY_READY_CHECK_UPSTREAMS`: `/ready` also requires every upstream's `/health` to
    /// answer. Default false: a command-service outage should not take the gateway's
    /// Redis-served reads and WebSockets out of the load balancer.
    #[serde(default)]
    pub gateway_ready_check_upstreams: bool,
}

mod defaults {
    use url::Url;

    // Literals that parse; `expect` documents that, it cannot fire on input.
    pub fn command_service_url() -> Url {
        Url::parse("http://127.0.0.1:8082").expect("a valid literal URL")
    }
    pub fn hub_url() -> Url {
        Url::parse("http://127.0.0.1:8085").expect("a valid literal URL")
    }
    pub fn rate_limit_timeout_ms() -> u64 {
        100
    }
    pub fn connect_timeout_ms() -> u64 {
        1000
    }
    pub fn request_timeout_ms() -> u64 {
        30_000
    }
    pub fn max_body_bytes() -> usize {
        1024 * 1024
    }
    pub fn pool_max_idle_per_host() -> usize {
        512
    }
}

fn config_error(message: String) -> ConfigError {
    ConfigError::from(envy::Error::Custom(message))
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let gateway: GatewayConfig = vars.parse()?;
        let specs = match (&gateway.gateway_routes, &gateway.gateway_routes_file) {
            (Some(_), Some(_)) => {
                return Err(config_error(
                    "set GATEWAY_ROUTES or GATEWAY_ROUTES_FILE, not both".into(),
                ));
            }
            (Some(json), None) => serde_json::from_str::<Vec<RouteSpec>>(json).map_err(|e| {
                config_error(format!("GATEWAY_ROUTES is not a valid route table: {e}"))
            })?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    config_error(format!(
                        "failed to read GATEWAY_ROUTES_FILE {}: {e}",
                        path.display()
                    ))
                })?;
                serde_json::from_str::<Vec<RouteSpec>>(&text).map_err(|e| {
                    config_error(format!(
                        "GATEWAY_ROUTES_FILE {} is not a valid route table: {e}",
                        path.display()
                    ))
                })?
            }
            (None, None) => routes::default_routes(),
        };
        for (name, url) in [
            (
                "GATEWAY_COMMAND_SERVICE_URL",
                &gateway.gateway_command_service_url,
            ),
            ("GATEWAY_HUB_URL", &gateway.gateway_hub_url),
        ] {
            routes::check_upstream(url).map_err(|e| config_error(format!("{name}: {e}")))?;
        }
        let routes = routes::build(
            &specs,
            &gateway.gateway_command_service_url,
            &gateway.gateway_hub_url,
        )
        .map_err(|e| config_error(e.to_string()))?;
        let policy_specs = match &gateway.gateway_rate_limits {
            Some(json) => serde_json::from_str::<Vec<PolicySpec>>(json).map_err(|e| {
                config_error(format!(
                    "GATEWAY_RATE_LIMITS is not a valid policy list: {e}"
                ))
            })?,
            None => Vec::new(),
        };
        let policies = ratelimit::policies(policy_specs).map_err(config_error)?;
        Ok(Self {
            common: vars.parse()?,
            redis: vars.parse()?,
            auth: vars.parse()?,
            gateway,
            routes,
            policies,
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// The service could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis settings were unusable.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The JWT settings were unusable.
    #[error(transparent)]
    Auth(#[from] common::auth::AuthError),
    /// The HTTP server failed.
    #[error("failed to serve HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// What the handlers need from the configuration.
#[derive(Debug)]
pub struct Settings {
    /// `REDIS_KEY_PREFIX`.
    pub redis_prefix: String,
    /// See `GATEWAY_TRUSTED_PROXY_HOPS`.
    pub trusted_proxy_hops: usize,
    /// The route table.
    pub routes: Vec<Arc<Route>>,
}

/// Shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    /// Readiness, metrics and drain settings.
    pub ops: Ops,
    /// Redis (rate limits, read model), connected in the background.
    pub redis: Redis,
    /// JWT verification.
    pub verifier: Verifier,
    /// Distributed rate limiting.
    pub limiter: RateLimiter,
    /// The upstream client.
    pub proxy: Proxy,
    /// Settings from the configuration.
    pub settings: Arc<Settings>,
}

impl AppState {
    /// Creates the clients; Redis connects in the background until `shutdown`.
    pub fn new(config: &Config, shutdown: &CancellationToken) -> Result<Self, Error> {
        let redis = Redis::connect_in_background(NAME, &config.redis, shutdown)?;
        let verifier = Verifier::new(&config.auth)?;
        let g = &config.gateway;
        let proxy = Proxy::new(
            NAME,
            ProxySettings {
                connect_timeout: Duration::from_millis(g.gateway_connect_timeout_ms),
                request_timeout: Duration::from_millis(g.gateway_request_timeout_ms),
                max_body_bytes: g.gateway_max_body_bytes,
                pool_max_idle_per_host: g.gateway_pool_max_idle_per_host,
            },
        );
        let limiter = RateLimiter::new(
            redis.clone(),
            ratelimit::Settings {
                service: NAME,
                policies: config.policies.clone(),
                prefix: config.redis.redis_key_prefix.clone(),
                timeout: Duration::from_millis(g.gateway_rate_limit_timeout_ms),
                fail_mode: g.gateway_rate_limit_fail_mode,
            },
        );
        // Without Redis the gateway still serves: reads fall back to the write model, and rate
        // limiting fails open (unless it is set to fail closed).
        let mut ops = Ops::new(NAME, &config.common);
        ops = match g.gateway_rate_limit_fail_mode {
            FailMode::Open => ops.with_optional(redis.clone()),
            FailMode::Closed => ops.with(redis.clone()),
        };
        if g.gateway_ready_check_upstreams {
            let mut seen = Vec::new();
            for route in &config.routes {
                if !seen.contains(&route.upstream) {
                    seen.push(route.upstream.clone());
                    ops = ops.with(UpstreamCheck::new(&route.upstream, &config.gateway));
                }
            }
        }
        if !verifier.is_enabled() {
            tracing::warn!(
                "No JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS_URL: every caller is anonymous and routes requiring a token answer 401."
            );
        }
        Ok(Self {
            ops,
            redis,
            verifier,
            limiter,
            proxy,
            settings: Arc::new(Settings {
                redis_prefix: config.redis.redis_key_prefix.clone(),
                trusted_proxy_hops: g.gateway_trusted_proxy_hops,
                routes: config.routes.iter().cloned().map(Arc::new).collect(),
            }),
        })
    }
}

/// Every route of the service: the operational routes and the route table.
pub fn router(state: &AppState) -> Router {
    // Shared, not cloned per request (a clone is a dozen reference counts and the pool's
    // client; the profile showed it).
    let shared = Arc::new(state.clone());
    let mut api = Router::new();
    for route in &state.settings.routes {
        for pattern in route.patterns() {
            let (route, shared) = (route.clone(), shared.clone());
            api = api.route(
                &pattern,
                any(move |request: Request| handle(shared.clone(), route.clone(), request)),
            );
        }
    }
    let router = common::http::ops_router(&state.ops).merge(api);
    common::http::instrument(router, NAME)
}

/// Serves until `shutdown` fires, then drains (`common::http::serve` passes the peer address
/// the forwarding fields and `ip` rate limits need).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    Ok(common::http::serve(listener, router(&state), &state.ops, shutdown).await?)
}

/// One request on a configured route: authenticate, rate-limit, dispatch.
async fn handle(state: Arc<AppState>, route: Arc<Route>, mut request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |info| info.0);
    let ip = common::http::client_ip(
        peer.ip(),
        request.headers(),
        state.settings.trusted_proxy_hops,
    );
    let identity =
        match identity::authenticate(NAME, &state.verifier, route.auth, request.headers()).await {
            Ok(identity) => identity,
            // A refused request still counts against the caller's address (and the route), so
            // a flood of bad tokens is limited like any other: 429 once over, the RateLimit
            // fields on the 401 until then.
            Err(response) => {
                let subjects = Subjects {
                    route: &route.name,
                    user: None,
                    client: None,
                    ip,
                };
                return limited(&state, &subjects, *response).await;
            }
        };
    let client = identity.client(request.headers());
    let subjects = Subjects {
        route: &route.name,
        user: identity.user(),
        client,
        ip,
    };
    let decision = match check(&state, &subjects).await {
        Ok(decision) => decision,
        Err(refused) => return *refused,
    };

    // The authenticated subject is the client upstream; a caller-supplied value never is.
    if let Identity::User(claims) = &identity {
        let headers = request.headers_mut();
        headers.remove(X_CLIENT_ID);
        match HeaderValue::from_str(&claims.sub) {
            Ok(value) => {
                headers.insert(X_CLIENT_ID, value);
            }
            Err(_) => {
                return Problem::new(ProblemType::Unauthorized, StatusCode::UNAUTHORIZED)
                    .detail("the token's `sub` claim cannot be sent in a header")
                    .into_response();
            }
        }
    }

    let caller = Caller { peer };
    let mut response = match route.kind {
        RouteKind::Proxy => {
            state
                .proxy
                .forward(&route.name, &route.upstream, &caller, request)
                .await
        }
        RouteKind::Documents => {
            // A route that requires a token also requires the token's grants to cover the
            // document (`common::access`); `optional` and `none` routes are public by
            // configuration. Commands are authorized by the command service, which reads
            // their body, so only this kind compiles the grants.
            let grants = match (&identity, route.auth) {
                (Identity::User(claims), AuthMode::Required) => Some(Grants::from_claims(claims)),
                _ => None,
            };
            documents::serve(&state, &route, &caller, grants.as_ref(), request).await
        }
        RouteKind::WebSocket => {
            state
                .proxy
                .upgrade(&route.name, &route.upstream, &caller, request)
                .await
        }
    };
    state
        .limiter
        .write_headers(&decision, response.headers_mut());
    response
}

/// The rate-limit decision for `subjects`, or the response that refuses the request (429 over
/// the limit, 503 when the limiter fails closed).
async fn check(state: &AppState, subjects: &Subjects<'_>) -> Result<Decision, Box<Response>> {
    if !state.limiter.is_enabled() {
        return Ok(Decision::Unlimited);
    }
    let decision = state.limiter.check(subjects).await;
    let refusal = match &decision {
        Decision::Denied { retry_after, .. } => {
            Problem::new(ProblemType::RateLimited, StatusCode::TOO_MANY_REQUESTS).detail(format!(
                "rate limit exceeded; retry in {} s",
                retry_after.as_secs_f64().ceil()
            ))
        }
        Decision::FailedClosed => Problem::new(
            ProblemType::DependencyUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .detail("rate limiting is unavailable"),
        Decision::Unlimited | Decision::Allowed(_) | Decision::FailedOpen => return Ok(decision),
    };
    let mut response = refusal.into_response();
    state
        .limiter
        .write_headers(&decision, response.headers_mut());
    Err(Box::new(response))
}

/// `response` (a refusal) once the request is counted: the refusal with the RateLimit fields,
/// or the 429 when the caller is over its limit.
async fn limited(state: &AppState, subjects: &Subjects<'_>, mut response: Response) -> Response {
    match check(state, subjects).await {
        Ok(decision) => {
            state
                .limiter
                .write_headers(&decision, response.headers_mut());
            response
        }
        Err(refused) => *refused,
    }
}

/// `/ready` check of one upstream: its `/health` answers 2xx.
struct UpstreamCheck {
    name: &'static str,
    url: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        axum::body::Body,
    >,
}

impl UpstreamCheck {
    fn new(upstream: &Url, config: &GatewayConfig) -> Self {
        let name = if upstream == &config.gateway_command_service_url {
            "command-service".to_owned()
        } else if upstream == &config.gateway_hub_url {
            "hub".to_owned()
        } else {
            format!("upstream {}", upstream.host_str().unwrap_or_default())
        };
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(
            config.gateway_connect_timeout_ms,
        )));
        Self {
            // Check names are `'static`; there is one per configured upstream, made once.
            name: Box::leak(name.into_boxed_str()),
            url: format!("{}/health", upstream.as_str().trim_end_matches('/')),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(connector),
        }
    }
}

impl Check for UpstreamCheck {
    fn name(&self) -> &'static str {
        self.name
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let uri: http::Uri = self.url.parse().map_err(|e| format!("{e}"))?;
            let request = http::Request::get(uri)
                .body(axum::body::Body::empty())
                .map_err(|e| e.to_string())?;
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("failed to reach {}: {e}", self.url))?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("{} answered {}", self.url, response.status()))
            }
        })
    }
}

/// The API gateway as a [`Service`].
pub struct ApiGateway;

impl Service for ApiGateway {
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = 8080;
    type Config = Config;

    async fn start(
        listener: TcpListener,
        config: Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let state = AppState::new(&config, &shutdown)?;
        run(listener, state, shutdown).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_has_working_defaults_and_rejects_bad_tables() {
        let config = Config::from_vars(&Vars::default()).unwrap();
        assert_eq!(config.routes.len(), 3);
        assert!(config.policies.is_empty());
        assert_eq!(config.gateway.gateway_rate_limit_fail_mode, FailMode::Open);

        let vars = Vars::from_pairs([
            (
                "GATEWAY_RATE_LIMITS",
                r#"[{"name":"u","key":"user","rate":5,"period":"Minute"}]"#,
            ),
            ("GATEWAY_RATE_LIMIT_FAIL_MODE", "closed"),
        ]);
        let config = Config::from_vars(&vars).unwrap();
        assert_eq!(config.policies.len(), 1);
        assert_eq!(
            config.gateway.gateway_rate_limit_fail_mode,
            FailMode::Closed
        );

        for (name, value) in [
            ("GATEWAY_ROUTES", "not json"),
            ("GATEWAY_RATE_LIMITS", r#"[{"name":"u"}]"#),
            ("GATEWAY_HUB_URL", "https://hub"),
            ("GATEWAY_ROUTES_FILE", "/nonexistent/routes.json"),
        ] {
            let err = Config::from_vars(&Vars::from_pairs([(name, value)])).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }
}
