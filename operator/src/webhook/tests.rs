//! The webhook's HTTPS server in process: conversions over TLS with a certificate its CA
//! vouches for, a swapped certificate served without a restart, and a client that never
//! starts its handshake cut off.
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::ServerLimits;
use common::shutdown::CancellationToken;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::*;

fn bundle() -> certs::Bundle {
    let names = vec!["127.0.0.1".to_owned()];
    certs::execute(
        certs::Plan::Issue,
        None,
        &names,
        Timestamp::now(),
        certs::Lifetimes::default(),
    )
    .unwrap()
}

/// The server on port 0 with `bundle`'s certificate; its address, resolver and stop.
async fn server(
    bundle: &certs::Bundle,
) -> (std::net::SocketAddr, Arc<Resolver>, CancellationToken) {
    let resolver = Arc::new(Resolver::default());
    resolver.set(certified_key(&bundle.tls_crt, &bundle.tls_key).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_secs(5),
        max_concurrent_requests: 8,
    };
    tokio::spawn(common::http::serve_tls(
        listener,
        router(),
        acceptor(resolver.clone()).unwrap(),
        "webhook-test",
        limits,
        Duration::from_secs(1),
        stop.clone(),
    ));
    (addr, resolver, stop)
}

/// POSTs `body` to `/convert` over TLS, trusting `ca_bundle`; the status line and the body.
async fn post(addr: std::net::SocketAddr, ca_bundle: &str, body: &Value) -> (String, String) {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /convert HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    (status, body.to_owned())
}

fn review() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {
            "uid": "u-1",
            "desiredAPIVersion": "meridian.dev/v1beta1",
            "objects": [{
                "apiVersion": "meridian.dev/v1alpha1",
                "kind": "MiddlewareStack",
                "metadata": {"name": "a"},
                "spec": {"services": {"wsHub": {"replicas": 2}}}
            }]
        }
    })
}

#[tokio::test]
async fn conversions_are_served_over_tls_and_a_new_certificate_without_a_restart() {
    let first = bundle();
    let (addr, resolver, stop) = server(&first).await;
    let (status, answer) = post(addr, &first.ca_crt, &review()).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response"]["uid"], "u-1");
    assert_eq!(
        answer["response"]["convertedObjects"][0]["spec"]["services"]["hub"]["replicas"],
        2
    );

    // A certificate from another CA: the next handshake presents it.
    let second = bundle();
    resolver.set(certified_key(&second.tls_crt, &second.tls_key).unwrap());
    let (status, _) = post(addr, &second.ca_crt, &review()).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    stop.cancel();
}

#[tokio::test]
async fn a_client_that_never_says_hello_is_cut_off_after_the_header_timeout() {
    let (addr, _resolver, stop) = server(&bundle()).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the server closed the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    stop.cancel();
}

#[tokio::test]
async fn a_malformed_review_gets_a_client_error() {
    let first = bundle();
    let (addr, _resolver, stop) = server(&first).await;
    let (status, answer) = post(addr, &first.ca_crt, &json!({"not": "a review"})).await;
    assert!(status.starts_with("HTTP/1.1 4"), "{status}");
    // The API server shows the body: it says what was wrong.
    assert!(answer.contains("apiVersion"), "{answer}");
    stop.cancel();
}
