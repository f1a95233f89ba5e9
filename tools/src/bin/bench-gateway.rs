//! `just bench-gateway`: the gateway's cost, measured against the same upstream in one run.
//!
//! It starts a minimal upstream in this process and two release gateway processes in front
//! of it (one plain proxy, one with JWT verification and a Redis rate-limit check on every
//! request), then measures with keep-alive HTTP/1.1 connections:
//! 1. throughput (requests/s) at `BENCH_CONCURRENCY` connections: direct, plain, JWT + limit;
//! 2. latency at one connection (no queueing): p50/p99 direct and through each gateway, and
//!    the latency the gateway adds;
//! 3. rate-limit checks/s against Redis (the limiter alone, `BENCH_CONCURRENCY` tasks);
//! 4. the peer, nginx (`BENCH_NGINX`: its binary, which `just bench-gateway` unpacks from
//!    Debian's package): `proxy_pass` to the same upstream with a keep-alive pool, measured
//!    by the same client in rounds that alternate with the plain gateway (`BENCH_ROUNDS`,
//!    default 2), with each proxy's CPU time per request from `/proc`.
//!
//! The gateways run as the operator deploys them (`RUST_LOG=info`, JSON logs: no line per
//! request); nginx runs with `worker_processes auto` and no access log, which is the same.
//! Settings: `BENCH_SECONDS` (per throughput phase, default 8), `BENCH_CONCURRENCY`
//! (default 64), `REDIS_URL`. Everything shares the host's cores, as it would in a pod.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use api_gateway::ratelimit::{self, FailMode, PolicySpec, RateLimiter, Subjects};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use common::config::{RedisConfig, Vars};
use common::procstat::CpuSnapshot;
use common::redis::Redis;
use common::shutdown::CancellationToken;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const SECRET: &str = "benchmark-secret-of-at-least-32-bytes";

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

struct Phase {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

async fn run() -> anyhow::Result<()> {
    let vars = Vars::from_env();
    let bench: BenchConfig = vars.parse()?;
    let (seconds, concurrency) = (bench.bench_seconds, bench.bench_concurrency.max(1));
    let redis_config: RedisConfig = vars.parse()?;

    let upstream = start_upstream().await?;
    let upstream_url = format!("http://{upstream}");
    let prefix = format!("bench:{}:", uuid::Uuid::now_v7());
    let routes = |auth: &str| {
        json!([{"name": "bench", "path": "/bench", "upstream": upstream_url, "auth": auth}])
            .to_string()
    };
    let policies = json!([
        {"name": "bench-user", "key": "user", "rate": 1_000_000, "period": "Second"},
        {"name": "bench-ip", "key": "ip", "rate": 1_000_000, "period": "Second"}
    ])
    .to_string();
    let nginx = match &bench.bench_nginx {
        Some(binary) => Some(Nginx::start(binary, upstream).await?),
        None => {
            println!("BENCH_NGINX is not set: no peer measured (`just bench-gateway` sets it)");
            None
        }
    };
    let (mut plain, plain_addr) = spawn_gateway(&[
        ("GATEWAY_ROUTES", routes("none")),
        ("REDIS_KEY_PREFIX", prefix.clone()),
    ])
    .await?;
    let (mut guarded, guarded_addr) = spawn_gateway(&[
        ("GATEWAY_ROUTES", routes("required")),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("JWT_SECRET", SECRET.into()),
        ("GATEWAY_RATE_LIMITS", policies),
    ])
    .await?;
    let token = format!(
        "Bearer {}",
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "bench-user", "exp": get_current_timestamp() + 3600}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )?
    );
    let duration = Duration::from_secs(seconds);

    println!(
        "bench-gateway: {concurrency} connections, {seconds} s per throughput phase, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Warm-up: pools, JIT-free but caches, the rate-limit script loaded.
    for (addr, auth) in [
        (upstream, None),
        (plain_addr, None),
        (guarded_addr, Some(token.as_str())),
    ] {
        load(addr, auth, concurrency, Duration::from_secs(1)).await?;
    }

    let direct = load(upstream, None, concurrency, duration).await?;
    let proxied = load(plain_addr, None, concurrency, duration).await?;
    let secured = load(guarded_addr, Some(&token), concurrency, duration).await?;
    let latency_time = Duration::from_secs(3);
    let direct_1 = load(upstream, None, 1, latency_time).await?;
    let proxied_1 = load(plain_addr, None, 1, latency_time).await?;
    let secured_1 = load(guarded_addr, Some(&token), 1, latency_time).await?;
    let checks =
        rate_limit_checks(&redis_config, &prefix, concurrency, Duration::from_secs(5)).await?;
    // The peer: nginx and the plain gateway in alternating rounds, CPU per request each.
    let mut rounds = Vec::new();
    if let Some(nginx) = &nginx {
        load(nginx.addr, None, concurrency, Duration::from_secs(1)).await?;
        for _ in 0..bench.bench_rounds.max(1) {
            let peer = measured(nginx.addr, "nginx", concurrency, duration).await?;
            let ours = measured(plain_addr, "api-gateway", concurrency, duration).await?;
            rounds.push((peer, ours));
        }
    }

    let _ = plain.start_kill();
    let _ = guarded.start_kill();
    let _ = plain.wait().await;
    let _ = guarded.wait().await;
    if let Some(nginx) = nginx {
        nginx.stop().await;
    }

    println!();
    println!("throughput ({concurrency} connections)      req/s   p50 ms   p99 ms   errors");
    for (name, phase) in [
        ("direct to upstream", &direct),
        ("through gateway (plain)", &proxied),
        ("through gateway (JWT + rate limit)", &secured),
    ] {
        println!(
            "  {name:<36} {:>8.0} {:>8.3} {:>8.3} {:>8}",
            phase.rps(),
            phase.p(0.5),
            phase.p(0.99),
            phase.errors
        );
    }
    println!("latency (1 connection)                   p50 ms   p99 ms   added p50   added p99");
    for (name, phase) in [
        ("direct to upstream", &direct_1),
        ("through gateway (plain)", &proxied_1),
        ("through gateway (JWT + rate limit)", &secured_1),
    ] {
        println!(
            "  {name:<36} {:>8.3} {:>8.3} {:>10.3} {:>10.3}",
            phase.p(0.5),
            phase.p(0.99),
            phase.p(0.5) - direct_1.p(0.5),
            phase.p(0.99) - direct_1.p(0.99)
        );
    }
    println!(
        "rate-limit checks against Redis: {checks:.0}/s ({concurrency} tasks, 2 policies per check)"
    );
    let peer_summary = peer_report(&rounds, &secured);

    let ratio = direct.rps() / proxied.rps();
    let added_p99 = proxied_1.p(0.99) - direct_1.p(0.99);
    println!();
    println!("targets");
    target(
        "plain proxy >= 25000 req/s",
        proxied.rps() >= 25_000.0,
        format!("{:.0}", proxied.rps()),
    );
    target(
        "throughput ratio direct/gateway <= 1.3",
        ratio <= 1.3,
        format!("{ratio:.2}"),
    );
    target(
        "added p99 latency <= 1 ms",
        added_p99 <= 1.0,
        format!("{added_p99:.3} ms"),
    );
    target(
        "JWT + rate limit >= 15000 req/s",
        secured.rps() >= 15_000.0,
        format!("{:.0}", secured.rps()),
    );
    if let Some((rps_ratio, cpu_ratio, secured_ratio)) = peer_summary {
        target(
            "gateway >= 1.0x nginx req/s (plain)",
            rps_ratio >= 1.0,
            format!("{rps_ratio:.2}x"),
        );
        target(
            "gateway <= 1.0x nginx CPU per request",
            cpu_ratio <= 1.0,
            format!("{cpu_ratio:.2}x"),
        );
        target(
            "JWT + rate limit >= 0.7x nginx plain",
            secured_ratio >= 0.7,
            format!("{secured_ratio:.2}x"),
        );
    }
    let peer_errors: u64 = rounds
        .iter()
        .map(|(peer, ours)| peer.phase.errors + ours.phase.errors)
        .sum();
    if direct.errors + proxied.errors + secured.errors + peer_errors > 0 {
        bail!("some requests failed");
    }
    Ok(())
}

/// One throughput phase and the CPU time per request of the processes named `process`.
struct Measured {
    phase: Phase,
    cpu_us_per_request: f64,
}

async fn measured(
    addr: SocketAddr,
    process: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let before = CpuSnapshot::take();
    let phase = load(addr, None, connections, duration).await?;
    let after = CpuSnapshot::take();
    let (shares, _) = after.since(&before);
    // A share of one core over the phase, summed over the process's workers.
    let core_share: f64 = shares
        .iter()
        .filter(|(name, _)| name == process)
        .map(|(_, share)| share)
        .sum();
    let cpu_us = core_share * phase.elapsed.as_secs_f64() * 1e6;
    Ok(Measured {
        cpu_us_per_request: cpu_us / (phase.requests.max(1) as f64),
        phase,
    })
}

/// Prints the alternating rounds against nginx and returns the ratios of their means:
/// gateway/nginx req/s, gateway/nginx CPU per request, and JWT + rate limit/nginx req/s.
fn peer_report(rounds: &[(Measured, Measured)], secured: &Phase) -> Option<(f64, f64, f64)> {
    if rounds.is_empty() {
        return None;
    }
    println!();
    println!("against nginx (same upstream, same client, alternating rounds)");
    println!("  round  proxy      req/s   p50 ms   p99 ms   CPU us/request");
    for (i, (peer, ours)) in rounds.iter().enumerate() {
        for (name, m) in [("nginx", peer), ("gateway", ours)] {
            println!(
                "  {:>5}  {name:<8} {:>8.0} {:>8.3} {:>8.3} {:>16.1}",
                i + 1,
                m.phase.rps(),
                m.phase.p(0.5),
                m.phase.p(0.99),
                m.cpu_us_per_request
            );
        }
    }
    let mean = |f: &dyn Fn(&(Measured, Measured)) -> f64| {
        rounds.iter().map(f).sum::<f64>() / rounds.len() as f64
    };
    let nginx_rps = mean(&|(peer, _)| peer.phase.rps());
    let ours_rps = mean(&|(_, ours)| ours.phase.rps());
    let nginx_cpu = mean(&|(peer, _)| peer.cpu_us_per_request);
    let ours_cpu = mean(&|(_, ours)| ours.cpu_us_per_request);
    let ratios = (
        ours_rps / nginx_rps,
        ours_cpu / nginx_cpu.max(f64::EPSILON),
        secured.rps() / nginx_rps,
    );
    println!(
        "  mean: nginx {nginx_rps:.0} req/s at {nginx_cpu:.1} us CPU/request; gateway {ours_rps:.0} \
         req/s at {ours_cpu:.1} us ({:.2}x the req/s, {:.2}x the CPU per request); JWT + rate \
         limit {:.2}x nginx's req/s",
        ratios.0, ratios.1, ratios.2
    );
    Some(ratios)
}

/// nginx in front of the upstream, as a reverse proxy is usually set up: a keep-alive pool
/// to the upstream, HTTP/1.1 to it, a worker per core, no access log. Its keep-alive
/// connections are not closed after 1,000 requests (nginx's default), since the gateway's
/// are not either and the load generator does not reconnect.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    binary: String,
}

impl Nginx {
    async fn start(binary: &str, upstream: SocketAddr) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("bench-gateway-nginx-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let conf = format!(
            "daemon off;\n\
             worker_processes auto;\n\
             pid {dir}/nginx.pid;\n\
             error_log stderr warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off;\n\
               keepalive_requests 100000000;\n\
               keepalive_timeout 300s;\n\
               client_body_temp_path {dir}/body;\n\
               proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fastcgi;\n\
               uwsgi_temp_path {dir}/uwsgi;\n\
               scgi_temp_path {dir}/scgi;\n\
               upstream bench {{ server {upstream}; keepalive 128; \
                 keepalive_requests 100000000; keepalive_timeout 300s; }}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location / {{\n\
                   proxy_pass http://bench;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                 }}\n\
               }}\n\
             }}\n",
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start nginx ({binary})"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_status(addr, "/bench").await.ok() != Some(200) {
            if Instant::now() > deadline {
                bail!("nginx on {addr} did not answer");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            addr,
            dir,
            binary: binary.to_owned(),
        })
    }

    /// `nginx -s stop`: the master stops its workers (killing the master alone would leave
    /// them running).
    async fn stop(mut self) {
        let stopped = Command::new(&self.binary)
            .arg("-p")
            .arg(&self.dir)
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .args(["-s", "stop"])
            .status()
            .await
            .is_ok_and(|status| status.success());
        if !stopped
            || tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn target(name: &str, met: bool, value: String) {
    println!(
        "  {name:<42} {value:>10}  {}",
        if met { "met" } else { "NOT met" }
    );
}

/// `BENCH_*` settings.
#[derive(serde::Deserialize)]
struct BenchConfig {
    #[serde(default = "default_seconds")]
    bench_seconds: u64,
    #[serde(default = "default_concurrency")]
    bench_concurrency: usize,
    /// The nginx binary to compare with.
    bench_nginx: Option<String>,
    /// Alternating nginx/gateway rounds.
    #[serde(default = "default_rounds")]
    bench_rounds: usize,
}

fn default_rounds() -> usize {
    2
}

fn default_seconds() -> u64 {
    8
}

fn default_concurrency() -> usize {
    64
}

async fn start_upstream() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = Router::new().route("/bench", get(|| async { "ok" }));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            eprintln!("upstream failed: {error}");
        }
    });
    Ok(addr)
}

fn gateway_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("no parent directory")?
        .join("api-gateway");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p api-gateway --bins`",
            path.display()
        );
    }
    Ok(path)
}

async fn spawn_gateway(env: &[(&str, String)]) -> anyhow::Result<(Child, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(gateway_binary()?)
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        // As the operator deploys it.
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(status) = get_status(addr, "/ready").await
            && status == 200
        {
            return Ok((child, addr));
        }
        if Instant::now() > deadline {
            bail!("the gateway on {addr} did not become ready (is Redis up? `just deps-up redis`)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    Ok(response.status().as_u16())
}

/// Latencies are recorded in microseconds, up to a minute (3 significant digits).
const MAX_MICROS: u64 = 60_000_000;

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_MICROS, 3)?)
}

/// `connections` keep-alive connections, each sending `GET /bench` back to back until
/// `duration` has passed.
async fn load(
    addr: SocketAddr,
    authorization: Option<&str>,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let authorization = authorization.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            connection_loop(addr, authorization, deadline).await
        }));
    }
    let mut phase = Phase {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: histogram()?,
    };
    for task in tasks {
        let (requests, errors, histogram) = task.await??;
        phase.requests += requests;
        phase.errors += errors;
        phase.latency.add(histogram)?;
    }
    phase.elapsed = started.elapsed();
    Ok(phase)
}

async fn connection_loop(
    addr: SocketAddr,
    authorization: Option<String>,
    deadline: Instant,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut histogram = histogram()?;
    let (mut requests, mut errors) = (0, 0);
    let host = addr.to_string();
    while Instant::now() < deadline {
        let mut request = Request::get("/bench").header(hyper::header::HOST, &host);
        if let Some(authorization) = &authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization);
        }
        let request = request.body(Empty::<Bytes>::new())?;
        let sent = Instant::now();
        let response = sender.send_request(request).await?;
        let ok = response.status().is_success();
        response.into_body().collect().await?;
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        histogram.record(micros.min(MAX_MICROS))?;
        requests += 1;
        if !ok {
            errors += 1;
        }
    }
    Ok((requests, errors, histogram))
}

/// The limiter alone: checks/s against Redis, each a two-policy script call.
async fn rate_limit_checks(
    config: &RedisConfig,
    prefix: &str,
    tasks: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let shutdown = CancellationToken::new();
    let redis = Redis::connect_in_background("bench-gateway", config, &shutdown)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.connection().is_err() {
        if Instant::now() > deadline {
            bail!("Redis is not reachable (is it up? `just deps-up redis`)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let specs: Vec<PolicySpec> = serde_json::from_value(json!([
        {"name": "bench-user", "key": "user", "rate": 1_000_000, "period": "Second"},
        {"name": "bench-ip", "key": "ip", "rate": 1_000_000, "period": "Second"}
    ]))?;
    let limiter = RateLimiter::new(
        redis,
        ratelimit::Settings {
            service: "bench-gateway",
            policies: ratelimit::policies(specs).map_err(anyhow::Error::msg)?,
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(1),
            fail_mode: FailMode::Closed,
        },
    );
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + duration;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (limiter, done) = (limiter.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let user = format!("user-{task}");
            while Instant::now() < end {
                let subjects = Subjects {
                    route: "bench",
                    user: Some(&user),
                    client: None,
                    ip: [127, 0, 0, 1].into(),
                };
                let decision = limiter.check(&subjects).await;
                if matches!(decision, ratelimit::Decision::Allowed(_)) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for handle in handles {
        handle.await?;
    }
    shutdown.cancel();
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
