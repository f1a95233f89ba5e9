//! `bench-hub` (`just bench-hub`): starts two hub processes (the `ws-hub` binary next to this
//! one, normally the release build) on the local Redis and measures, in one run of a
//! few minutes:
//!
//! 1. memory per idle connection: hub RSS delta over 10 000 connections (each subscribed to
//!    one room), then again at 50 000 (from several loopback source addresses) — on hub A
//!    when one process may hold that many descriptors, else spread over fresh hubs that each
//!    hold what one process may, every one loaded by its own `meridian-loadgen` process;
//! 2. deliveries/s to one room with 10 000 subscribers (a burst published through
//!    `common::rooms`, timed until every subscriber has every publication), then to `--rooms`
//!    rooms (30) with the same subscribers spread over them, the burst to each room, all
//!    published at once;
//! 3. publish → deliver latency across replicas: a client publishes through hub A, clients
//!    on hub B receive (p50/p99 over the run).
//!
//! With `--centrifugo <binary>` (as `just bench-hub` runs it), the same three figures are then
//! measured on Centrifugo, the peer, in the same run: two nodes on the same Redis (its Redis
//! engine, history like the hub's), the same client code paths (connect with a JWT, subscribe,
//! read, publish over the WebSocket), and the summary prints each ratio with its goal.
//!
//! With `--redis-cluster` (`just bench-hub-cluster`) the hubs run on a Redis Cluster
//! (`REDIS_CLUSTER=true`, `REDIS_URL` its seed: `--redis-cluster-url`, else
//! `MERIDIAN_REDIS_CLUSTER_URL`), rooms being sharded channels, and there are three of them:
//! the fan-out's subscribers are spread evenly over hubs A, B and C (so deliveries cross hubs
//! through the cluster), the latency publisher on A reaches subscribers on B and C, and the
//! 50 000 connections are spread over three fresh hubs at least. Centrifugo is not run then:
//! the peer comparison is on one Redis.
//!
//! The hubs log as the operator deploys them (`RUST_LOG=info`, JSON); the settings that differ
//! from a deployed hub are printed first. Each figure is printed with its target and whether
//! it was met. The clients run in this
//! process (or its load generators), on the same cores as the hubs, so figures are
//! conservative.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use common::config::{RedisConfig, Vars};
use common::redis::Redis;
use common::rooms::{HistorySettings, Rooms};
use common::shutdown::CancellationToken;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use ws_hub::loadgen::{self, Client, Stats, Target};

mod centrifugo;
mod cluster;

/// The hubs' names, in the order they start.
const NAMES: [&str; 3] = ["A", "B", "C"];

/// Benchmark of the WebSocket hub.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Connections for the first memory figure and the fan-out.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connections for the second memory figure (0: skip).
    #[arg(long, default_value_t = 50_000)]
    max_connections: usize,
    /// Publications in the fan-out burst.
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Publications for the latency figure.
    #[arg(long, default_value_t = 2000)]
    latency_publications: u64,
    /// Their rate per second.
    #[arg(long, default_value_t = 500.0)]
    latency_rate: f64,
    /// Subscribers for the latency figure: on hub B (on B and C with `--redis-cluster`).
    #[arg(long, default_value_t = 100)]
    latency_subscribers: usize,
    /// The hubs' `RUST_LOG` (default: what the operator deploys).
    #[arg(long, default_value = "info")]
    rust_log: String,
    /// Centrifugo's binary: measure it too, as the peer (`dev/tools.sh path centrifugo`; not
    /// with `--redis-cluster`).
    #[arg(long)]
    centrifugo: Option<PathBuf>,
    /// Rooms for the second fan-out figure: the fan-out's subscribers also join one of them
    /// each (spread evenly), and the burst goes to every room at once (0: skip).
    #[arg(long, default_value_t = 30)]
    rooms: usize,
    /// Run on a Redis Cluster: three hubs with `REDIS_CLUSTER=true` and `REDIS_URL` its seed
    /// (`--redis-cluster-url`, else `MERIDIAN_REDIS_CLUSTER_URL`).
    #[arg(long)]
    redis_cluster: bool,
    /// The cluster's seed node(s), `redis://[user:password@]host:port` (default:
    /// `MERIDIAN_REDIS_CLUSTER_URL`, the cluster `just deps-up redis` starts).
    #[arg(long, requires = "redis_cluster")]
    redis_cluster_url: Option<String>,
}

/// The figures compared with the peer.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    /// Publish → deliver across two nodes at `latency_rate` × `latency_subscribers`, ms.
    p50: f64,
    /// Same, p99.
    p99: f64,
    /// RSS growth per idle subscribed connection at `connections`, KiB.
    kib_per_connection: f64,
    /// Burst deliveries/s to one room of `connections` subscribers.
    deliveries_per_second: f64,
    /// Burst deliveries/s to `rooms` rooms sharing those subscribers.
    rooms_deliveries_per_second: Option<f64>,
    /// Connections and RSS growth per idle connection at `max_connections`, KiB.
    at_max: Option<(usize, f64)>,
}

struct Hub {
    child: Child,
    port: u16,
}

impl Hub {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(&self.child)
    }
}

/// A child process's resident memory in KiB.
fn rss_kib(child: &Child) -> anyhow::Result<u64> {
    let pid = child.id().context("the process exited")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_hub(binary: &Path, env: &[(&str, String)]) -> anyhow::Result<Hub> {
    let port = free_port()?;
    let child = Command::new(binary)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        // JSON lines, as the operator deploys the hub (`RUST_LOG` comes with `env`).
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    Ok(Hub { child, port })
}

async fn wait_subscribable(target: &Target) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match loadgen::subscribed(target, None, "bench:probe").await {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => bail!("hub not ready: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn token(secret: &str) -> anyhow::Result<String> {
    let exp = common::rooms::now_micros() / 1_000_000 + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "bench", "rooms": ["bench:*"], "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

struct Report(Vec<(String, String, String, bool)>);

impl Report {
    fn add(&mut self, what: &str, measured: String, target: &str, met: bool) {
        println!(
            "{what}: {measured} (target {target}) {}",
            if met { "MET" } else { "NOT MET" }
        );
        self.0.push((what.into(), measured, target.into(), met));
    }
}

async fn settle_rss(hub: &Hub) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    hub.rss_kib()
}

/// [`settle_rss`] of every hub (one wait).
async fn settle_rss_all(hubs: &[Hub]) -> anyhow::Result<Vec<u64>> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    hubs.iter().map(Hub::rss_kib).collect()
}

/// The hubs' summed RSS growth from `baselines` to `now`, and `b → n, …` to print.
fn grown(baselines: &[u64], now: &[u64]) -> (u64, String) {
    let grown = baselines
        .iter()
        .zip(now)
        .map(|(baseline, now)| now.saturating_sub(*baseline))
        .sum();
    let changes = baselines
        .iter()
        .zip(now)
        .map(|(baseline, now)| format!("{baseline} → {now}"))
        .collect::<Vec<_>>()
        .join(", ");
    (grown, changes)
}

/// Part `i` of `total` split evenly into `parts`.
fn share(total: usize, parts: usize, i: usize) -> usize {
    let parts = parts.max(1);
    total / parts + usize::from(i < total % parts)
}

/// `hub A`, `hubs B and C`: `hubs` hubs from the `first`.
fn names(first: usize, hubs: usize) -> String {
    let names: Vec<&str> = NAMES.iter().copied().skip(first).take(hubs).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("hubs {} and {last}", rest.join(", ")),
        _ => format!("hub {}", names.concat()),
    }
}

/// Opens `count` subscribers of `room` spread evenly over `targets`, in order.
async fn open_spread(targets: &[Target], count: usize, room: &str) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(count);
    for (i, target) in targets.iter().enumerate() {
        clients.extend(open(target, share(count, targets.len(), i), room, &[]).await?);
    }
    Ok(clients)
}

/// Subscribes client `i` to `rooms[i % rooms.len()]` too, `concurrency` at a time; how many
/// were subscribed, and the first failure.
async fn join_rooms(
    clients: &mut [Client],
    rooms: &[String],
    concurrency: usize,
) -> (usize, Option<String>) {
    if rooms.is_empty() {
        return (0, None);
    }
    let results: Vec<Result<(), loadgen::LoadError>> =
        futures::stream::iter(clients.iter_mut().enumerate())
            .map(|(i, client)| async move {
                let room = &rooms[i % rooms.len()];
                client.send(loadgen::subscribe_frame(room)).await?;
                loadgen::expect_json(client, "subscribed").await?;
                Ok(())
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    let joined = results.iter().filter(|r| r.is_ok()).count();
    let failure = results
        .into_iter()
        .find_map(Result::err)
        .map(|e| e.to_string());
    (joined, failure)
}

/// Prints how many connections opened since `started`, and the first failure.
fn print_opened(opened: usize, started: Instant, failures: &[impl std::fmt::Display]) {
    println!(
        "  opened {opened} connections in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        failures
            .first()
            .map(|e| format!(" ({} failed; first: {e})", failures.len()))
            .unwrap_or_default()
    );
}

/// The latencies (µs) the readers reported, as a histogram.
fn latencies(received: &mut mpsc::UnboundedReceiver<u64>) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    while let Ok(micros) = received.try_recv() {
        histogram.record(micros.max(1))?;
    }
    Ok(histogram)
}

/// The p50 and p99 of `histogram`, in ms.
fn quantiles_ms(histogram: &Histogram<u64>) -> (f64, f64) {
    (
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
    )
}

/// Waits (at most `within`) until `stats` counts `expected` deliveries (or a connection
/// closed); returns the deliveries and the seconds since `started`.
async fn await_deliveries(
    stats: &Stats,
    expected: u64,
    started: Instant,
    within: Duration,
) -> (u64, f64) {
    let deadline = started + within;
    while stats.deliveries.load(Ordering::Relaxed) < expected
        && stats.closed.load(Ordering::Relaxed) == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (
        stats.deliveries.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}

/// The same three figures on Centrifugo: two nodes on `redis_url`, `args`' load.
async fn measure_centrifugo(
    args: &Args,
    binary: &Path,
    dir: &TempDir,
    redis_url: &str,
    report: &mut Report,
) -> anyhow::Result<Figures> {
    let prefix = format!("bench-centrifugo-{}", uuid::Uuid::new_v4().simple());
    let secret = uuid::Uuid::new_v4().simple().to_string() + "-bench-secret";
    let a = centrifugo::spawn(binary, dir, "a", redis_url, &prefix, &secret)?;
    let b = centrifugo::spawn(binary, dir, "b", redis_url, &prefix, &secret)?;
    let exp = common::rooms::now_micros() / 1_000_000 + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "bench", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    centrifugo::wait_subscribable(&a, &token).await?;
    centrifugo::wait_subscribable(&b, &token).await?;
    let mut figures = Figures::default();

    println!(
        "centrifugo latency: {} publications at {}/s through node A to {} subscribers on node B",
        args.latency_publications, args.latency_rate, args.latency_subscribers
    );
    let (subscribers, failures) = b
        .open_subscribers(&token, args.latency_subscribers, "bench_latency", &[], 256)
        .await;
    if let Some(error) = failures.first() {
        bail!("{} subscriptions failed; first: {error}", failures.len());
    }
    let stats = Arc::new(Stats::default());
    let (latency_tx, mut latency_rx) = mpsc::unbounded_channel();
    let samplers = subscribers.len();
    centrifugo::spawn_readers(subscribers, &stats, samplers, &latency_tx);
    drop(latency_tx);
    let publisher = a.connect(&token, None).await?;
    let acked = centrifugo::publish_paced(
        publisher,
        "bench_latency",
        args.latency_rate,
        args.latency_publications,
        64,
    )
    .await?;
    let expected = acked * samplers as u64;
    await_deliveries(&stats, expected, Instant::now(), Duration::from_secs(10)).await;
    let histogram = latencies(&mut latency_rx)?;
    (figures.p50, figures.p99) = quantiles_ms(&histogram);
    report.add(
        "centrifugo: publish → deliver across two nodes, p99",
        format!(
            "{:.2} ms (p50 {:.2} ms, {} samples of {expected})",
            figures.p99,
            figures.p50,
            histogram.len()
        ),
        "(peer)",
        histogram.len() == expected,
    );

    println!(
        "centrifugo memory: {} idle connections on node A",
        args.connections
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = a.rss_kib()?;
    let started = Instant::now();
    let (clients, failures) = a
        .open_subscribers(&token, args.connections, "bench_fanout", &[], 256)
        .await;
    print_opened(clients.len(), started, &failures);
    let opened = clients.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = a.rss_kib()?;
    figures.kib_per_connection = rss.saturating_sub(baseline) as f64 / opened.max(1) as f64;
    report.add(
        &format!("centrifugo: memory per idle connection at {opened} connections"),
        format!(
            "{:.1} KiB (node RSS {baseline} → {rss} KiB)",
            figures.kib_per_connection
        ),
        "(peer)",
        opened == args.connections,
    );

    let stats = Arc::new(Stats::default());
    let (latency_tx, _latency_rx) = mpsc::unbounded_channel();
    centrifugo::spawn_readers(clients, &stats, 0, &latency_tx);
    let expected = (args.burst * opened) as u64;
    println!(
        "centrifugo fan-out: {} publications (server API) to one channel with {opened} subscribers",
        args.burst
    );
    let http = reqwest::Client::new();
    let payload = loadgen::timed_payload(64);
    let started = Instant::now();
    futures::future::try_join_all(
        (0..args.burst).map(|_| a.api_publish(&http, "bench_fanout", &payload)),
    )
    .await?;
    let (delivered, elapsed) =
        await_deliveries(&stats, expected, started, Duration::from_secs(90)).await;
    figures.deliveries_per_second = delivered as f64 / elapsed;
    report.add(
        &format!("centrifugo: deliveries/s, one channel, {opened} subscribers"),
        format!(
            "{:.0}/s ({delivered} of {expected} in {elapsed:.2} s, {} connections dropped)",
            figures.deliveries_per_second,
            stats.closed.load(Ordering::Relaxed)
        ),
        "(peer)",
        delivered == expected,
    );
    drop((a, b));
    Ok(figures)
}

/// A directory only this run (and this user) uses, removed on drop: the token the load
/// generators read (kept off their command lines), Centrifugo's configuration files.
struct TempDir(PathBuf);

fn tempdir() -> anyhow::Result<TempDir> {
    use std::os::unix::fs::DirBuilderExt as _;
    let path = std::env::temp_dir().join(format!("bench-hub-{}", uuid::Uuid::new_v4().simple()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    Ok(TempDir(path))
}

impl TempDir {
    /// Writes `contents` to a new file `name` in the directory; its path.
    fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, contents)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn open(
    target: &Target,
    count: usize,
    room: &str,
    sources: &[IpAddr],
) -> anyhow::Result<Vec<Client>> {
    let started = Instant::now();
    let (clients, failures) = loadgen::open_subscribers(target, count, room, sources, 256).await;
    print_opened(clients.len(), started, &failures);
    Ok(clients)
}

/// Memory per idle connection for `max - opened` more connections on hub A, from this
/// process (which fits them all).
async fn idle_on_one_hub(
    hub: &Hub,
    target: &Target,
    report: &mut Report,
    opened: usize,
    max: usize,
    baseline: u64,
) -> anyhow::Result<(usize, f64)> {
    let more = max - opened;
    println!("memory: {more} more idle connections on hub A (total {max})");
    // One loopback source address has ~28k ephemeral ports towards one hub port.
    let sources: Vec<IpAddr> = (2..=5)
        .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        .collect();
    // The first connections just took part in the fan-out (their buffers grew); the idle
    // figure is the cost of the connections added now, on top of them.
    let before = settle_rss(hub).await?;
    let extra = open(target, more, "bench:idle", &sources).await?;
    let total = opened + extra.len();
    let rss = settle_rss(hub).await?;
    let per = (rss.saturating_sub(before)) as f64 / extra.len().max(1) as f64;
    let overall = (rss.saturating_sub(baseline)) as f64 / total.max(1) as f64;
    report.add(
        &format!("memory per idle connection at {total} connections"),
        format!(
            "{per:.1} KiB for the {} added idle (hub RSS {before} → {rss} KiB; \
             {overall:.1} KiB/connection overall incl. the 10k after fan-out)",
            extra.len()
        ),
        "≤ 12 KB",
        per <= 12.0 && total == max,
    );
    Ok((total, per))
}

/// Memory per idle connection at `total` connections on the local host when one process may
/// not hold them (or the run has several hubs): `count` fresh hubs, the connections spread
/// evenly over them, every one loaded by its own `meridian-loadgen` process (the binary next
/// to this one) from its own loopback address; the figure is the hubs' summed RSS growth over
/// the connections open.
async fn idle_on_several_hubs(
    binary: &Path,
    env: &[(&str, String)],
    token: &str,
    token_file: &Path,
    report: &mut Report,
    total: usize,
    count: usize,
) -> anyhow::Result<(usize, f64)> {
    let count = count.max(1);
    let shares: Vec<usize> = (0..count).map(|i| share(total, count, i)).collect();
    println!("memory: {total} idle connections over {count} fresh hubs ({shares:?})");
    let mut hubs = Vec::new();
    for share in &shares {
        let mut env: Vec<(&str, String)> = env
            .iter()
            .filter(|(key, _)| *key != "HUB_MAX_CONNECTIONS")
            .cloned()
            .collect();
        env.push(("HUB_MAX_CONNECTIONS", (share + 100).to_string()));
        hubs.push(spawn_hub(binary, &env)?);
    }
    for hub in &hubs {
        let url = format!("ws://127.0.0.1:{}/ws", hub.port);
        wait_subscribable(&Target::new(&url, Some(token.to_owned()), false).await?).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baselines = hubs
        .iter()
        .map(Hub::rss_kib)
        .collect::<anyhow::Result<Vec<u64>>>()?;

    let loadgen = binary.with_file_name("meridian-loadgen");
    let started = Instant::now();
    let mut generators = Vec::new();
    for (i, (hub, share)) in hubs.iter().zip(&shares).enumerate() {
        let source = Ipv4Addr::new(127, 0, 0, u8::try_from(2 + i).context("too many hubs")?);
        let child = Command::new(&loadgen)
            .arg("--url")
            .arg(format!("ws://127.0.0.1:{}/ws", hub.port))
            .arg("--token-file")
            .arg(token_file)
            .args(["--connections", &share.to_string()])
            .args(["--room", "bench:idle", "--samplers", "0"])
            .args(["--duration-seconds", "3600", "--connect-concurrency", "256"])
            .args(["--source-ips", &source.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", loadgen.display()))?;
        generators.push(child);
    }
    let mut connected = 0;
    for generator in &mut generators {
        let stdout = generator.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let opened = tokio::time::timeout(Duration::from_secs(300), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("connected ") {
                    let count = rest.split_whitespace().next().unwrap_or_default();
                    return count
                        .parse::<usize>()
                        .with_context(|| format!("unexpected load generator output: {line}"));
                }
                println!("  loadgen: {line}");
            }
            bail!("the load generator exited before connecting")
        })
        .await
        .context("the load generator did not connect within 300 s")??;
        connected += opened;
        // Keep its pipe drained; show anything but the per-second figures.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.starts_with("t=") {
                    println!("  loadgen: {line}");
                }
            }
        });
    }
    println!(
        "  opened {connected} connections in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut grown = 0;
    let mut rss_all = Vec::new();
    for (hub, baseline) in hubs.iter().zip(&baselines) {
        let rss = hub.rss_kib()?;
        grown += rss.saturating_sub(*baseline);
        rss_all.push(format!("{baseline} → {rss}"));
    }
    let per = grown as f64 / connected.max(1) as f64;
    report.add(
        &format!("memory per idle connection at {connected} connections"),
        format!(
            "{per:.1} KiB ({count} hubs, RSS {} KiB)",
            rss_all.join(", ")
        ),
        "≤ 12 KB",
        per <= 12.0 && connected == total,
    );
    drop(generators);
    Ok((connected, per))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster_url = if args.redis_cluster {
        let url = args
            .redis_cluster_url
            .clone()
            .or_else(|| std::env::var("MERIDIAN_REDIS_CLUSTER_URL").ok())
            .filter(|url| !url.is_empty())
            .context(
                "--redis-cluster needs --redis-cluster-url or MERIDIAN_REDIS_CLUSTER_URL \
                 (`eval \"$(bash dev/deps.sh env)\"` sets it for the local cluster)",
            )?;
        Some(url)
    } else {
        None
    };
    let wanted = (args.max_connections.max(args.connections) as u64) * 2 + 4096;
    let limit = loadgen::raise_open_files(wanted)?;
    println!("open-files limit: {limit} (wanted {wanted} for the clients and the hub)");
    let log = if args.rust_log == "info" {
        String::new()
    } else {
        format!(" RUST_LOG={} (deployed: info),", args.rust_log)
    };
    let differences = format!(
        "{log} HUB_MAX_CONNECTIONS sized to the run, HUB_MAX_CONNECTIONS_PER_SUBJECT=0 (one \
         token for every client), HUB_MESSAGE_RATE/BURST=10000 and HUB_PUBLISH_ROOMS=bench:* \
         (the latency publisher is a client), HUB_HISTORY_SIZE=1000"
    );
    println!(
        "hubs run as the operator deploys them (RUST_LOG=info, LOG_FORMAT=json), except:\
         {differences}"
    );

    let vars = Vars::from_env();
    let mut redis_config: RedisConfig = vars.parse()?;
    redis_config.redis_cluster = cluster_url.is_some();
    let (mode, cluster) = match &cluster_url {
        Some(url) => {
            redis_config.redis_url = SecretString::from(url.clone());
            let mut seed = cluster::Seed::connect(url).await?;
            let cluster = seed.cluster().await?;
            let mode = format!(
                "Redis Cluster with {} masters (CLUSTER INFO cluster_size on the seed {})",
                cluster.masters, seed.address
            );
            (mode, Some(cluster))
        }
        None => {
            let address = cluster::address(redis_config.redis_url.expose_secret());
            (format!("one Redis ({address})"), None)
        }
    };
    println!("mode: {mode}");
    let prefix = format!("bench-{}:", uuid::Uuid::new_v4().simple());
    redis_config.redis_key_prefix.clone_from(&prefix);
    let secret = uuid::Uuid::new_v4().simple().to_string() + "-bench-secret";
    let binary = std::env::current_exe()?
        .parent()
        .context("no executable directory")?
        .join("ws-hub");
    let env = [
        (
            "REDIS_URL",
            redis_config.redis_url.expose_secret().to_owned(),
        ),
        ("REDIS_CLUSTER", redis_config.redis_cluster.to_string()),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("JWT_SECRET", secret.clone()),
        ("RUST_LOG", args.rust_log.clone()),
        (
            "HUB_MAX_CONNECTIONS",
            (args.max_connections.max(args.connections) + 100).to_string(),
        ),
        // Every benchmark client uses one token, so one subject.
        ("HUB_MAX_CONNECTIONS_PER_SUBJECT", "0".to_owned()),
        ("HUB_PUBLISH_ROOMS", "bench:*".to_owned()),
        ("HUB_MESSAGE_RATE", "10000".to_owned()),
        ("HUB_MESSAGE_BURST", "10000".to_owned()),
        ("HUB_HISTORY_SIZE", "1000".to_owned()),
        ("HUB_HISTORY_TTL_SECONDS", "120".to_owned()),
    ];
    // Two hubs on one Redis; three on a cluster, so that deliveries cross hubs (and shards).
    let hub_count = if cluster.is_some() { 3 } else { 2 };
    let hubs = (0..hub_count)
        .map(|_| spawn_hub(&binary, &env))
        .collect::<anyhow::Result<Vec<Hub>>>()?;
    let token = token(&secret)?;
    let dir = tempdir()?;
    let token_file = dir.write("token.jwt", token.as_bytes())?;
    let mut targets = Vec::with_capacity(hubs.len());
    for hub in &hubs {
        let url = format!("ws://127.0.0.1:{}/ws", hub.port);
        targets.push(Target::new(&url, Some(token.clone()), false).await?);
    }
    for target in &targets {
        wait_subscribable(target).await?;
    }
    let (target_a, receivers) = targets.split_first().context("no hub")?;
    let mut report = Report(Vec::new());

    // 1. Publish on A → deliver on the others (before the big phases, so it measures the
    //    path, not the load of 10 000 other clients in this process).
    let receiving = names(1, receivers.len());
    println!(
        "latency: {} publications at {}/s through hub A to {} subscribers on {receiving}",
        args.latency_publications, args.latency_rate, args.latency_subscribers
    );
    let subscribers = open_spread(receivers, args.latency_subscribers, "bench:latency").await?;
    let latency_stats = Arc::new(Stats::default());
    let (latency_tx, mut latency_rx) = mpsc::unbounded_channel();
    let samplers = subscribers.len();
    loadgen::spawn_readers(subscribers, &latency_stats, samplers, &latency_tx);
    drop(latency_tx);
    let publisher = target_a.connect(None).await?;
    let acked = loadgen::publish_paced(
        publisher,
        "bench:latency",
        args.latency_rate,
        args.latency_publications,
        64,
    )
    .await?;
    let expected = acked * samplers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while latency_stats.deliveries.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let histogram = latencies(&mut latency_rx)?;
    let mut hub = Figures::default();
    (hub.p50, hub.p99) = quantiles_ms(&histogram);
    let p99 = hub.p99;
    let across = if receivers.len() == 1 {
        "two replicas".to_owned()
    } else {
        format!("replicas, hub A → {receiving}")
    };
    report.add(
        &format!("publish → deliver across {across}, p99"),
        format!(
            "{p99:.2} ms (p50 {:.2} ms, max {:.2} ms, {} samples)",
            histogram.value_at_quantile(0.5) as f64 / 1000.0,
            histogram.max() as f64 / 1000.0,
            histogram.len()
        ),
        "≤ 20 ms",
        p99 <= 20.0 && histogram.len() == expected,
    );

    // 2. Memory per idle connection at `connections`: on hub A, or spread over the three hubs
    //    of a cluster run (the fan-out's subscribers).
    let fanout_hubs = if cluster.is_some() { hubs.len() } else { 1 };
    let (fanout_hubs, fanout_targets) = (&hubs[..fanout_hubs], &targets[..fanout_hubs]);
    let over = names(0, fanout_hubs.len());
    println!("memory: {} idle connections on {over}", args.connections);
    let baselines = settle_rss_all(fanout_hubs).await?;
    let mut clients = open_spread(fanout_targets, args.connections, "bench:fanout").await?;
    let opened = clients.len();
    let rss = settle_rss_all(fanout_hubs).await?;
    let (growth, changes) = grown(&baselines, &rss);
    let per = growth as f64 / opened.max(1) as f64;
    hub.kib_per_connection = per;
    let on = if fanout_hubs.len() == 1 {
        String::new()
    } else {
        format!(" on {} hubs", fanout_hubs.len())
    };
    report.add(
        &format!("memory per idle connection at {opened} connections{on}"),
        format!("{per:.1} KiB (hub RSS {changes} KiB)"),
        "≤ 12 KB",
        per <= 12.0 && opened == args.connections,
    );

    // Each of them joins one of `rooms` rooms too (after the memory figure, which is for
    // connections in one room), for the fan-out to several rooms below.
    let room_names: Vec<String> = (0..args.rooms)
        .map(|i| format!("bench:rooms-{i}"))
        .collect();
    let mut joined = 0;
    if !room_names.is_empty() {
        let started = Instant::now();
        let failure;
        (joined, failure) = join_rooms(&mut clients, &room_names, 256).await;
        println!(
            "rooms: {joined} of the {opened} subscribers joined one of {} rooms each in {:.1} s{}",
            room_names.len(),
            started.elapsed().as_secs_f64(),
            failure
                .map(|e| format!(" ({} failed; first: {e})", opened - joined))
                .unwrap_or_default()
        );
    }

    // 3. Fan-out: a burst to one room with `connections` subscribers.
    let stats = Arc::new(Stats::default());
    let (latency_tx, _latency_rx) = mpsc::unbounded_channel();
    loadgen::spawn_readers(clients, &stats, 0, &latency_tx);
    // The publisher's handle waits longer for replies than a service does (REDIS_TIMEOUT_MS,
    // 1 s by default): this process reads every delivery too, on the hubs' cores, and a burst
    // to many rooms has thousands of publications in flight while the first ones fan out.
    let publisher_config = RedisConfig {
        redis_timeout_ms: redis_config.redis_timeout_ms.max(30_000),
        ..redis_config.clone()
    };
    let redis =
        Redis::connect_in_background("bench-hub", &publisher_config, &CancellationToken::new())?;
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    while redis.connection().is_err() {
        if Instant::now() > connect_deadline {
            bail!("the benchmark's Redis handle did not connect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rooms = Rooms::new(
        redis.clone(),
        HistorySettings {
            size: 1000,
            ttl: Duration::from_secs(120),
        },
    );
    let expected = (args.burst * opened) as u64;
    println!(
        "fan-out: {} publications to one room with {opened} subscribers{on}",
        args.burst
    );
    let started = Instant::now();
    let payload = serde_json::to_vec(&loadgen::timed_payload(64))?;
    futures::future::try_join_all((0..args.burst).map(|_| rooms.publish("bench:fanout", &payload)))
        .await?;
    let (delivered, elapsed) =
        await_deliveries(&stats, expected, started, Duration::from_secs(90)).await;
    let rate = delivered as f64 / elapsed;
    hub.deliveries_per_second = rate;
    report.add(
        &format!("deliveries/s, one room, {opened} subscribers{on}"),
        format!(
            "{rate:.0}/s ({delivered} of {expected} in {elapsed:.2} s, {} connections dropped)",
            stats.closed.load(Ordering::Relaxed)
        ),
        "≥ 250 000/s",
        rate >= 250_000.0 && delivered == expected,
    );

    // 3b. The same burst to each of `rooms` rooms at once, the subscribers spread over them
    //     (and, on a cluster, the rooms over its shards).
    if !room_names.is_empty() {
        if let Some(cluster) = &cluster
            && let Some(url) = &cluster_url
        {
            let channels: Vec<String> = room_names.iter().map(|r| rooms.channel(r)).collect();
            let mut seed = cluster::Seed::connect(url).await?;
            println!(
                "  the rooms' channels by master: {}",
                cluster.spread(&mut seed, &channels).await?
            );
        }
        let before = stats.deliveries.load(Ordering::Relaxed);
        let expected = (args.burst * joined) as u64;
        println!(
            "fan-out: {} publications to each of {} rooms at once ({} in all), {joined} \
             subscribers{on} spread over them",
            args.burst,
            room_names.len(),
            args.burst * room_names.len()
        );
        let started = Instant::now();
        futures::future::try_join_all(
            (0..args.burst)
                .flat_map(|_| room_names.iter())
                .map(|room| rooms.publish(room, &payload)),
        )
        .await?;
        let (delivered, elapsed) =
            await_deliveries(&stats, before + expected, started, Duration::from_secs(90)).await;
        let delivered = delivered - before;
        let rate = delivered as f64 / elapsed;
        hub.rooms_deliveries_per_second = Some(rate);
        report.add(
            &format!(
                "deliveries/s, {} rooms, {joined} subscribers{on}",
                room_names.len()
            ),
            format!(
                "{rate:.0}/s ({delivered} of {expected} in {elapsed:.2} s, {} connections \
                 dropped)",
                stats.closed.load(Ordering::Relaxed)
            ),
            "(comparison)",
            delivered == expected && joined == opened,
        );
    }

    // 4. Memory per idle connection at `max_connections`: added to the ones open on hub A
    //    when one process may hold them all (one Redis), else spread over fresh hubs (below),
    //    three at least on a cluster.
    if args.max_connections > opened {
        // Each process (this one holds the clients, the hub their peers) needs one descriptor
        // per connection; without privilege the hard RLIMIT_NOFILE caps one process.
        let per_process = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(1000);
        let at_max = if fanout_hubs.len() == 1 && args.max_connections <= per_process {
            idle_on_one_hub(
                &hubs[0],
                target_a,
                &mut report,
                opened,
                args.max_connections,
                baselines[0],
            )
            .await?
        } else {
            if args.max_connections > per_process {
                println!(
                    "  {} connections do not fit in one process here: RLIMIT_NOFILE is {limit} \
                     (hard limit, not raisable without CAP_SYS_RESOURCE); spreading them over \
                     hubs of at most {per_process}, each with its own load-generator process",
                    args.max_connections
                );
            }
            let count = args
                .max_connections
                .div_ceil(per_process.max(1))
                .max(fanout_hubs.len());
            idle_on_several_hubs(
                &binary,
                &env,
                &token,
                &token_file,
                &mut report,
                args.max_connections,
                count,
            )
            .await?
        };
        hub.at_max = Some(at_max);
    }

    drop(hubs);
    if cluster.is_some() {
        println!(
            "centrifugo: not run on a Redis Cluster; the peer comparison runs on one Redis \
             (`just bench-hub`)"
        );
    } else if let Some(binary) = &args.centrifugo {
        // The hubs' clients close with them; give the sockets a moment to go.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let peer = measure_centrifugo(
            &args,
            binary,
            &dir,
            redis_config.redis_url.expose_secret(),
            &mut report,
        )
        .await?;
        let delivery_ratio = hub.deliveries_per_second / peer.deliveries_per_second.max(1.0);
        report.add(
            "deliveries/s, hub ÷ Centrifugo",
            format!(
                "{delivery_ratio:.2}× ({:.0} vs {:.0}/s)",
                hub.deliveries_per_second, peer.deliveries_per_second
            ),
            "≥ 5×",
            delivery_ratio >= 5.0,
        );
        let memory_ratio = hub.kib_per_connection / peer.kib_per_connection.max(0.001);
        report.add(
            "memory per idle connection, hub ÷ Centrifugo",
            format!(
                "{memory_ratio:.2}× ({:.1} vs {:.1} KiB)",
                hub.kib_per_connection, peer.kib_per_connection
            ),
            "≤ 0.2×",
            memory_ratio <= 0.2,
        );
        let offered = args.latency_rate * args.latency_subscribers as f64;
        report.add(
            &format!("p99 at {offered:.0} deliveries/s offered, hub (Centrifugo)"),
            format!(
                "{:.2} ms, p50 {:.2} ms (Centrifugo {:.2} ms, p50 {:.2} ms)",
                hub.p99, hub.p50, peer.p99, peer.p50
            ),
            "≤ 25 ms",
            hub.p99 <= 25.0,
        );
    }

    println!("\nsummary");
    println!("  mode: {mode}; {hub_count} hubs");
    println!("  hubs as the operator deploys them, except:{differences}");
    println!(
        "  deliveries/s, one room of {opened} subscribers{on}: {:.0}/s",
        hub.deliveries_per_second
    );
    if let Some(rate) = hub.rooms_deliveries_per_second {
        println!(
            "  deliveries/s, {} rooms sharing {joined} subscribers{on}: {rate:.0}/s",
            room_names.len()
        );
    }
    println!(
        "  memory per idle connection: {:.1} KiB at {opened}{}",
        hub.kib_per_connection,
        hub.at_max
            .map(|(connections, kib)| format!(", {kib:.1} KiB at {connections}"))
            .unwrap_or_default()
    );
    println!(
        "  publish → deliver across {across}: p50 {:.2} ms, p99 {:.2} ms",
        hub.p50, hub.p99
    );
    println!("  each figure against its target:");
    for (what, measured, target, met) in &report.0 {
        println!(
            "  {:<50} {:<60} {:<12} {}",
            what,
            measured,
            target,
            if *met { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
