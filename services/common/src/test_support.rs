//! Helpers for integration tests: free ports, waiting with timeouts (never sleeping as an
//! assertion), a TCP proxy that can take a dependency "down" and bring it back, child
//! processes that are cleaned up, and the local dependencies' addresses.
#![allow(clippy::panic, clippy::unwrap_used)] // test code: failing loudly is the point

pub mod otlp;
pub mod plans;
pub mod tls_redis;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::{KafkaConfig, PostgresConfig, RedisConfig, Vars};

/// Addresses of the local dependencies (`just deps-up`), from the same variables and defaults
/// the services use.
pub struct Deps {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `REDIS_CLUSTER`: the suites run on a Redis Cluster (`REDIS_URL` a seed node).
    pub redis_cluster: bool,
    /// `KAFKA_BOOTSTRAP_SERVERS`.
    pub kafka_bootstrap_servers: String,
}

impl Deps {
    /// Reads the environment once.
    pub fn from_env() -> Self {
        let vars = Vars::from_env();
        let pg: PostgresConfig = vars.parse().unwrap();
        let redis: RedisConfig = vars.parse().unwrap();
        let kafka: KafkaConfig = vars.parse().unwrap();
        Self {
            database_url: pg.database_url.expose_secret().to_owned(),
            redis_url: redis.redis_url.expose_secret().to_owned(),
            redis_cluster: redis.redis_cluster,
            kafka_bootstrap_servers: kafka.kafka_bootstrap_servers,
        }
    }

    /// `host:port` of a URL-shaped address.
    pub fn socket_of(url: &str) -> SocketAddr {
        let url = url::Url::parse(url).unwrap();
        let host = url.host_str().unwrap();
        let port = url.port().unwrap();
        format!("{host}:{port}").parse().unwrap()
    }
}

/// A binary of any workspace crate (`command-service`, `processor`, the tools'
/// `meridian-runner`, …), next to the running test executable (`target/debug/deps/it-…` →
/// `target/debug/<name>`): every package's binaries land in the same folder. `just test`
/// builds every binary before the tests run; when running one crate's tests by hand, build
/// them first (`cargo build --workspace --bins`, or `cargo build --bin <name>`).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --bin {name}` (or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` every 50 ms until it returns true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GETs `url` and returns the status and JSON body (`Null` when the body is not JSON).
pub async fn get_json(url: &str) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    ))
}

/// The Prometheus text a service serves at `<base>/metrics` (panics when it does not answer).
pub async fn metrics_text(base: &str) -> String {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let response = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A TCP forwarder on a fixed local port that plays a dependency going down and coming back:
/// while down, nothing listens (connections are refused) and open connections are cut. While
/// frozen it plays a peer that vanished without closing anything: connections stay open and
/// new ones are accepted, but no byte passes either way.
pub struct TcpToggle {
    port: u16,
    target: SocketAddr,
    running: Option<CancellationToken>,
    frozen: CancellationToken,
}

impl TcpToggle {
    /// A forwarder to `target`, initially down.
    pub fn new(target: SocketAddr) -> Self {
        Self {
            port: free_port(),
            target,
            running: None,
            frozen: CancellationToken::new(),
        }
    }

    /// The port clients should use.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts listening and forwarding.
    pub async fn up(&mut self) {
        if self.running.is_some() {
            return;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let token = CancellationToken::new();
        self.frozen = CancellationToken::new();
        let (stop, target, frozen) = (token.clone(), self.target, self.frozen.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let (stop, frozen) = (stop.clone(), frozen.clone());
                tokio::spawn(async move {
                    if frozen.is_cancelled() {
                        // Accepted, never answered.
                        stop.cancelled().await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = frozen.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                    }
                    // Frozen: both sockets stay open, silent, until the toggle goes down.
                    stop.cancelled().await;
                    drop((inbound, outbound));
                });
            }
        });
        self.running = Some(token);
    }

    /// Stops forwarding without closing anything (until [`TcpToggle::down`]).
    pub fn freeze(&self) {
        self.frozen.cancel();
    }

    /// Stops listening and cuts every forwarded connection.
    pub async fn down(&mut self) {
        if let Some(token) = self.running.take() {
            token.cancel();
            // Wait until the port really refuses connections.
            let port = self.port;
            wait_until(
                "the toggled port to close",
                Duration::from_secs(5),
                || async move { TcpStream::connect(("127.0.0.1", port)).await.is_err() },
            )
            .await;
        }
    }
}

impl Drop for TcpToggle {
    fn drop(&mut self) {
        if let Some(token) = self.running.take() {
            token.cancel();
        }
    }
}

/// A child process killed when dropped; its output goes to a log file under `target/`.
pub struct ChildProcess {
    child: Child,
}

impl ChildProcess {
    /// Starts `program` with `env` added to the test's environment, output to `log`.
    pub fn spawn(program: &Path, env: &[(&str, String)], log: &Path) -> Self {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(program)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e}", program.display()));
        Self { child }
    }

    /// Sends SIGTERM and waits for the exit status (panics after `timeout`).
    pub async fn terminate(mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("process {pid} did not exit within {timeout:?} of SIGTERM"))
            .unwrap()
    }

    /// Whether the process has exited already.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

/// A service started in this process on an ephemeral port, through the same
/// [`Service::start`](crate::service::Service::start) its binary uses.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts service `S` configured from `vars`.
    pub async fn start<S: crate::service::Service>(vars: &Vars) -> Self {
        let config = <S::Config as crate::service::ServiceConfig>::from_vars(vars).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(S::start(listener, config, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits for the server to finish cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("service did not stop within 30 s")
            .unwrap()
            .unwrap();
    }
}

/// Variables for a test: the process environment, with a short readiness timeout.
pub fn test_vars() -> Vars {
    Vars::from_env()
        .with("READINESS_TIMEOUT_MS", "1500")
        .with("RUST_LOG", "warn")
}

/// Waits until `ready_url` (a service's `/ready`) answers 200; panics after `timeout`.
pub async fn wait_ready(ready_url: &str, timeout: Duration) {
    wait_until(&format!("{ready_url} to answer 200"), timeout, || async {
        matches!(get_json(ready_url).await, Some((200, _)))
    })
    .await;
}

/// Replaces the port in a dependency address (`scheme://…:port/…` or `host:port`).
pub fn with_port(address: &str, port: u16) -> String {
    match url::Url::parse(address) {
        Ok(mut url) if url.has_host() => {
            url.set_port(Some(port)).unwrap();
            url.to_string()
        }
        _ => {
            let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
            format!("{host}:{port}")
        }
    }
}

/// The binary-level contract of every service: started as a process with only environment
/// variables, it serves `/health`, turns `/ready` 200 once its dependencies answer, exposes
/// Prometheus metrics, and exits 0 on SIGTERM.
pub async fn assert_binary_lifecycle(program: &Path, service: &str) {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("meridian-{service}-{port}.log"));
    let process = ChildProcess::spawn(
        program,
        &[
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".into()),
            ("LOG_FORMAT", "json".into()),
        ],
        &log,
    );
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/ready");
    wait_until(
        &format!("{service} /ready to answer 200 (log: {})", log.display()),
        Duration::from_secs(60),
        || {
            let ready = ready.clone();
            async move { matches!(get_json(&ready).await, Some((200, _))) }
        },
    )
    .await;

    let (status, body) = get_json(&format!("{base}/health")).await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (_, report) = get_json(&ready).await.unwrap();
    assert_eq!(report["service"], service);
    assert_eq!(report["status"], "ready");

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "http_requests_total",
        "dependency_up",
        "meridian_build_info",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }

    let status = process.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "{service} exited with {status} after SIGTERM (log: {})",
        log.display()
    );
}

/// The readiness contract for a required dependency: with `var` pointing at a closed port the
/// service still starts, `/ready` is 503 (`not_ready`) and names `dependency` as down; once
/// the dependency answers on that port, `/ready` turns 200 without a restart. Checks named
/// `<dependency>-<something>` (the hub's `redis-pubsub`) are other connections to the same
/// dependency and go down with it.
pub async fn assert_ready_tracks_dependency<S: crate::service::Service>(
    dependency: &str,
    var: &str,
    real_address: &str,
) {
    ready_follows::<S>(dependency, var, real_address, true).await;
}

/// The readiness contract for an optional dependency: while it is down, `/ready` stays 200
/// with status `degraded` and names it as down and not required; once it is back, `ready`.
pub async fn assert_ready_degrades_without_dependency<S: crate::service::Service>(
    dependency: &str,
    var: &str,
    real_address: &str,
) {
    ready_follows::<S>(dependency, var, real_address, false).await;
}

async fn ready_follows<S: crate::service::Service>(
    dependency: &str,
    var: &str,
    real_address: &str,
    required: bool,
) {
    let mut toggle = TcpToggle::new(Deps::socket_of(&as_url(real_address)));
    let vars = test_vars().with(var, with_port(real_address, toggle.port()));
    let app = TestApp::start::<S>(&vars).await;
    let ready = app.url("/ready");

    // The other dependencies connect in the background; wait for them, so that the report
    // below can only be about the one that is down.
    let same = |name: &str| {
        name == dependency
            || name
                .strip_prefix(dependency)
                .is_some_and(|rest| rest.starts_with('-'))
    };
    let others_up = |report: &serde_json::Value| {
        report["dependencies"].as_object().is_some_and(|deps| {
            deps.iter()
                .all(|(name, s)| same(name) || s["status"] == "up")
        })
    };
    wait_until(
        "the other dependencies to be up",
        Duration::from_secs(30),
        || {
            let ready = ready.clone();
            async move {
                get_json(&ready)
                    .await
                    .is_some_and(|(_, report)| others_up(&report))
            }
        },
    )
    .await;
    let (status, report) = get_json(&ready).await.unwrap();
    let expected = if required {
        (503, "not_ready")
    } else {
        (200, "degraded")
    };
    assert_eq!(
        (status, report["status"].as_str()),
        (expected.0, Some(expected.1)),
        "{report}"
    );
    assert_eq!(
        report["dependencies"][dependency]["required"], required,
        "{report}"
    );
    assert_eq!(
        report["dependencies"][dependency]["status"], "down",
        "{report}"
    );
    assert!(
        report["dependencies"][dependency]["error"].is_string(),
        "{report}"
    );
    assert!(
        others_up(&report),
        "only {dependency} should be down: {report}"
    );

    toggle.up().await;
    wait_until(
        &format!("/ready to be 200 `ready` after {dependency} came back"),
        Duration::from_secs(45),
        || {
            let ready = ready.clone();
            async move {
                matches!(get_json(&ready).await, Some((200, report)) if report["status"] == "ready")
            }
        },
    )
    .await;
    app.stop().await;
}

fn as_url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("tcp://{address}")
    }
}

/// A Redis URL for a fresh ACL user confined like a stack's (`redis_acl::rules(prefix)`): the
/// services' suites connect as it, so they run with exactly what the operator allows.
///
/// On a cluster (`REDIS_CLUSTER`) the user is created on every node, as the operator does.
pub fn stack_redis_url(prefix: &str) -> String {
    let deps = Deps::from_env();
    let user = format!("it-{}", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().simple().to_string();
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg(&user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"))
        .arg(crate::redis_acl::rules(prefix));
    for node in redis_nodes(&deps) {
        let mut admin = redis::Client::open(node.as_str())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        let () = setuser.query(&mut admin).unwrap();
    }
    let mut url = url::Url::parse(&deps.redis_url).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some(&password)).unwrap();
    url.to_string()
}

/// The URLs of every Redis node: `REDIS_URL` alone, or on a cluster every node its
/// `CLUSTER NODES` lists (same credentials as `REDIS_URL`).
pub fn redis_nodes(deps: &Deps) -> Vec<String> {
    if !deps.redis_cluster {
        return vec![deps.redis_url.clone()];
    }
    let mut seed = redis::Client::open(deps.redis_url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut seed).unwrap();
    nodes
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|address| {
            // `host:port@cport[,hostname]`
            let host_port = address.split('@').next().unwrap();
            let mut url = url::Url::parse(&deps.redis_url).unwrap();
            let (host, port) = host_port.rsplit_once(':').unwrap();
            url.set_host(Some(host)).unwrap();
            url.set_port(Some(port.parse().unwrap())).unwrap();
            url.to_string()
        })
        .collect()
}

/// A connection for assertions to what `REDIS_URL` names (a cluster with `REDIS_CLUSTER`),
/// with the default user.
pub async fn redis_connection() -> crate::redis::RedisConnection {
    let config: RedisConfig = Vars::from_env().parse().unwrap();
    crate::redis::connect_once(&config).await.unwrap()
}

/// The frames published on one pub/sub channel.
pub type ChannelFrames = futures::stream::BoxStream<'static, Vec<u8>>;

/// Subscribes to `channel` (a sharded channel with `REDIS_CLUSTER`, as the hub does) as the
/// default user; subscribed when this returns.
pub async fn subscribe_channel(channel: &str) -> ChannelFrames {
    use futures::StreamExt as _;
    let config: RedisConfig = Vars::from_env().parse().unwrap();
    if !config.redis_cluster {
        let client = crate::redis::client_for(&config).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(channel).await.unwrap();
        return pubsub
            .into_on_message()
            .map(|message| message.get_payload_bytes().to_vec())
            .boxed();
    }
    let (client, rx) = crate::redis::cluster_pubsub_for(&config).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    conn.ssubscribe(channel).await.unwrap();
    futures::stream::unfold((rx, conn), |(mut rx, conn)| async move {
        loop {
            let push = rx.recv().await?;
            if push.kind == redis::PushKind::SMessage
                && let Some(redis::Value::BulkString(frame)) = push.data.get(1)
            {
                return Some((frame.clone(), (rx, conn)));
            }
        }
    })
    .boxed()
}

/// Sends `POST path` with `headers` (each `Name: value`) and a body of `size` bytes declared
/// in `Content-Length`, the way a client that does not wait for an early answer does, and
/// reads the whole response. Returns the response's text and whether the whole body could be
/// written (a server that closed without reading the rest makes the write fail with a reset,
/// and often loses the response too).
pub async fn post_oversize(
    addr: SocketAddr,
    path: &str,
    headers: &[String],
    size: usize,
) -> (String, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: test\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    ));
    let body = vec![b'x'; size];
    let sender = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(&body).await?;
        writer.shutdown().await
    });
    let mut response = Vec::new();
    let read = reader.read_to_end(&mut response).await;
    assert!(read.is_ok(), "{read:?} after {} bytes", response.len());
    let sent = sender.await.unwrap().is_ok();
    (String::from_utf8_lossy(&response).into_owned(), sent)
}
