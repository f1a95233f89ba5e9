//! Shared pieces of the gateway's integration tests: an echo upstream that reports what it
//! received, tokens, gateway start-up (in process or as a binary) and Redis access.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use common::config::Vars;
use common::test_support::{ChildProcess, TestApp, free_port, get_json, test_vars, wait_until};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

/// The HMAC secret every test gateway trusts.
pub const SECRET: &str = "integration-test-secret-of-32-bytes!!";
/// The audience every test gateway expects.
pub const AUDIENCE: &str = "meridian";
/// The issuer every test gateway expects.
pub const ISSUER: &str = "https://idp.test";

/// A unique Redis key prefix for one test.
pub fn prefix(test: &str) -> String {
    format!("gw-test:{test}:{}:", uuid::Uuid::now_v7())
}

/// Claims of a valid token for `sub`, allowed to read and write every document.
pub fn claims(sub: &str) -> Value {
    json!({
        "sub": sub,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "exp": get_current_timestamp() + 600,
        "client_id": format!("{sub}-app"),
        "read": ["*"],
        "write": ["*"],
    })
}

/// Claims of a valid token for `sub` with these `read` and `write` grants.
pub fn granted(sub: &str, read: &[&str], write: &[&str]) -> Value {
    let mut claims = claims(sub);
    claims["read"] = json!(read);
    claims["write"] = json!(write);
    claims
}

/// An HS256 token over `claims`.
pub fn token(claims: &Value) -> String {
    token_with(SECRET, claims)
}

/// An HS256 token over `claims` signed with `secret`.
pub fn token_with(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `Authorization: Bearer` for `sub`.
pub fn bearer(sub: &str) -> String {
    format!("Bearer {}", token(&claims(sub)))
}

/// A server on an ephemeral port, stopped when dropped.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `router` on 127.0.0.1.
    pub async fn start(router: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self { addr, task }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The echo upstream: every request is answered with what arrived (`method`, `path`,
/// `query`, `headers`, `body` length); `GET /v1/documents/{c}/{id}` plays the write model
/// (`{"source": "write-model", ...}`); `/ws` echoes WebSocket messages.
pub async fn echo_upstream() -> Server {
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/documents/{collection}/{id}",
            get(
                |Path((collection, id)): Path<(String, String)>| async move {
                    if id == "absent" {
                        return (StatusCode::NOT_FOUND, axum::Json(json!({"status": 404})));
                    }
                    (
                        StatusCode::OK,
                        axum::Json(
                            json!({"source": "write-model", "collection": collection, "id": id}),
                        ),
                    )
                },
            ),
        )
        .route(
            "/ws",
            get(|upgrade: WebSocketUpgrade| async move {
                upgrade.on_upgrade(|mut socket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        if matches!(message, Message::Text(_) | Message::Binary(_))
                            && socket.send(message).await.is_err()
                        {
                            break;
                        }
                    }
                })
            }),
        )
        .fallback(any(echo));
    Server::start(router).await
}

async fn echo(request: Request) -> impl IntoResponse {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    axum::Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers_json(&parts.headers),
        "body": body.len(),
    }))
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>").to_owned());
    }
    serde_json::to_value(map).unwrap()
}

/// Variables of a gateway in front of `upstream` (both named upstreams), trusting the test
/// secret, with its own Redis prefix.
pub fn gateway_vars(upstream: &str, prefix: &str) -> Vars {
    test_vars()
        .with("REDIS_KEY_PREFIX", prefix)
        .with("GATEWAY_COMMAND_SERVICE_URL", upstream)
        .with("GATEWAY_HUB_URL", upstream)
        .with("JWT_SECRET", SECRET)
        .with("JWT_AUDIENCE", AUDIENCE)
        .with("JWT_ISSUER", ISSUER)
}

/// Starts a gateway in this process and waits until it is ready (Redis connected).
pub async fn start_gateway(vars: &Vars) -> TestApp {
    let app = TestApp::start::<api_gateway::ApiGateway>(vars).await;
    wait_ready(&app.url("/ready")).await;
    app
}

/// Waits for `/ready` to answer 200.
pub async fn wait_ready(url: &str) {
    wait_until("the gateway to be ready", Duration::from_secs(30), || {
        let url = url.to_owned();
        async move { matches!(get_json(&url).await, Some((200, _))) }
    })
    .await;
}

/// Starts the gateway binary with `env` (plus a port, loopback bind and the test Redis).
pub async fn spawn_gateway(name: &str, env: &[(&str, String)]) -> (ChildProcess, String) {
    let port = free_port();
    let mut all: Vec<(&str, String)> = vec![
        ("PORT", port.to_string()),
        ("BIND_ADDRESS", "127.0.0.1".into()),
        ("RUST_LOG", "warn".into()),
    ];
    all.extend(env.iter().cloned());
    let log = std::env::temp_dir().join(format!("meridian-gateway-{name}-{port}.log"));
    let process = ChildProcess::spawn(env!("CARGO_BIN_EXE_api-gateway").as_ref(), &all, &log);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{base}/ready")).await;
    (process, base)
}

/// A Redis connection to the test instance (a cluster with `REDIS_CLUSTER`).
pub async fn redis() -> common::redis::RedisConnection {
    common::test_support::redis_connection().await
}

/// An HTTP client that does not pool (each test sees fresh connections).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}
