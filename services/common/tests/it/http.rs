//! The shared HTTP server's bounds, on a real socket: slow headers and idle keep-alive
//! connections are closed, a stalled body fails its request, and requests beyond the
//! concurrency limit are shed with 503 while the operational routes still answer.
// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use common::config::CommonConfig;
use common::http::{Ops, instrument, ops_router, serve};
use common::shutdown::CancellationToken;
use common::test_support::test_vars;
use futures::FutureExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A server with 300 ms header and body timeouts and room for two requests at once.
async fn start() -> (SocketAddr, CancellationToken) {
    let config: CommonConfig = test_vars()
        .with("HTTP_HEADER_READ_TIMEOUT_MS", "300")
        .with("HTTP_BODY_TIMEOUT_MS", "300")
        .with("HTTP_MAX_CONCURRENT_REQUESTS", "2")
        .parse()
        .unwrap();
    let ops = Ops::new("http-test", &config);
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                "done"
            }),
        )
        .route("/echo", post(|body: String| async move { body }));
    let router = instrument(ops_router(&ops).merge(app), "http-test");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move { serve(listener, router, &ops, stop).await });
    (addr, shutdown)
}

/// Reads until the server closes the connection; panics if it stays open for 3 s.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut received))
        .await
        .expect("the server kept the connection open")
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let (addr, shutdown) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let received = read_until_closed(&mut stream).await;
    assert!(!received.contains("200 OK"), "{received}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    shutdown.cancel();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let (addr, shutdown) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let received = read_until_closed(&mut stream).await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_stalled_body_fails_its_request_instead_of_holding_it() {
    let (addr, shutdown) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\n\
              Content-Length: 100\r\n\r\nonly ten b",
        )
        .await
        .unwrap();
    let received = read_until_closed(&mut stream).await;
    let status = received.lines().next().unwrap_or_default();
    assert!(
        status.starts_with("HTTP/1.1 4") || status.starts_with("HTTP/1.1 5"),
        "{received}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn requests_beyond_the_limit_are_shed_with_503_and_probes_still_answer() {
    let (addr, shutdown) = start().await;
    let http = reqwest::Client::new();
    let slow = |http: reqwest::Client| async move {
        http.get(format!("http://{addr}/slow"))
            .send()
            .await
            .unwrap()
    };
    let first = tokio::spawn(slow(http.clone()));
    let second = tokio::spawn(slow(http.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let shed = slow(http.clone()).await;
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(shed.headers()["content-type"], "application/problem+json");
    let ready = http
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "probes are exempt from shedding");

    assert_eq!(first.await.unwrap().status(), 200);
    assert_eq!(second.await.unwrap().status(), 200);
    assert_eq!(slow(http).await.status(), 200, "capacity is back");
    shutdown.cancel();
}

#[tokio::test]
async fn with_an_ops_port_readiness_and_metrics_leave_the_public_port() {
    let ops_port = common::test_support::free_port();
    let config: CommonConfig = test_vars()
        .with("OPS_PORT", ops_port.to_string())
        .with("BIND_ADDRESS", "127.0.0.1")
        .parse()
        .unwrap();
    let ops = Ops::new("http-test", &config);
    let app = Router::new().route("/hello", get(|| async { "hi" }));
    let router = instrument(ops_router(&ops).merge(app), "http-test");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let server = tokio::spawn(async move { serve(listener, router, &ops, stop).await });
    let status =
        |url: String| async move { reqwest::get(url).await.map(|r| r.status().as_u16()).ok() };
    common::test_support::wait_until("the ops port to answer", Duration::from_secs(10), || {
        status(format!("http://127.0.0.1:{ops_port}/health"))
            .then(|s| async move { s == Some(200) })
    })
    .await;
    for (path, expected) in [
        ("/hello", 200),
        ("/health", 200),
        ("/ready", 404),
        ("/metrics", 404),
    ] {
        assert_eq!(
            status(format!("http://{public}{path}")).await,
            Some(expected),
            "public {path}"
        );
    }
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            status(format!("http://127.0.0.1:{ops_port}{path}")).await,
            Some(200),
            "ops {path}"
        );
    }
    assert_eq!(
        status(format!("http://127.0.0.1:{ops_port}/hello")).await,
        Some(404),
        "the ops port serves nothing else"
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
    assert_eq!(
        status(format!("http://127.0.0.1:{ops_port}/health")).await,
        None,
        "the ops port closes with the server"
    );
}

/// A method is any token a client sends; as a label it would let clients create metric series
/// at will. Other methods than the standard ones are counted as `other`.
#[tokio::test]
async fn request_metrics_do_not_take_any_method_as_a_label() {
    let (addr, shutdown) = start().await;
    for n in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("BREW{n} /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let received = read_until_closed(&mut stream).await;
        assert!(received.starts_with("HTTP/1.1 405"), "{received}");
    }
    let metrics = common::test_support::metrics_text(&format!("http://{addr}")).await;
    assert!(!metrics.contains("method=\"BREW"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("http_requests_total{") && l.contains("method=\"other\"")),
        "{metrics}"
    );
    shutdown.cancel();
}
