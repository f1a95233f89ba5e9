//! `meridian-loadgen`: load against a running hub (yours, in your cluster). Opens
//! `--connections` subscribers to `--room`, optionally publishes timed payloads through the
//! hub at `--publish-rate`, and prints connections, deliveries/s and publish → deliver
//! latency (p50/p99, from the first `--samplers` subscribers) every second.
//!
//! ```text
//! meridian-loadgen --url ws://hub.example:8085/ws --token "$JWT" \
//!     --connections 5000 --room bench:load --publish-rate 50 --duration-seconds 60
//! ```
//! The token needs `rooms` covering the room; publishing also needs the room in the hub's
//! `HUB_PUBLISH_ROOMS`, and each publisher connection is held to `HUB_MESSAGE_RATE`
//! (spread the rate over `--publishers`).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use ws_hub::loadgen::{self, Stats, Target};

/// Load generator for the Meridian WebSocket hub.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The hub's WebSocket URL (`ws://host:port/ws`).
    #[arg(long)]
    url: String,
    /// Access token (JWT) with `rooms` covering `--room` (visible in `ps`; prefer
    /// `--token-file`).
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the access token.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Subscriber connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The room every subscriber joins and publishers publish to.
    #[arg(long, default_value = "bench:load")]
    room: String,
    /// Publications per second in total (0: subscribers only, idle).
    #[arg(long, default_value_t = 0.0)]
    publish_rate: f64,
    /// Publisher connections sharing the rate.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Padding bytes in each publication.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// How long to run after connecting.
    #[arg(long, default_value_t = 30)]
    duration_seconds: u64,
    /// Connection attempts in flight.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Local addresses to connect from, round robin (each has ~28k ephemeral ports).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Subscribers that measure latency.
    #[arg(long, default_value_t = 100)]
    samplers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wanted = (args.connections + args.publishers) as u64 + 1024;
    let limit = loadgen::raise_open_files(wanted).context("failed to read the open-files limit")?;
    if limit < wanted {
        eprintln!("warning: open-files limit {limit} is below the {wanted} this run needs");
    }
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => args.token.clone(),
    };
    let target = Target::new(&args.url, token, false).await?;

    let started = Instant::now();
    let (clients, failures) = loadgen::open_subscribers(
        &target,
        args.connections,
        &args.room,
        &args.source_ips,
        args.connect_concurrency,
    )
    .await;
    println!(
        "connected {} of {} subscribers in {:.1} s",
        clients.len(),
        args.connections,
        started.elapsed().as_secs_f64()
    );
    if let Some(error) = failures.first() {
        println!("{} failed; first error: {error}", failures.len());
    }

    let stats = Arc::new(Stats::default());
    let (latency_tx, mut latency_rx) = mpsc::unbounded_channel();
    loadgen::spawn_readers(clients, &stats, args.samplers, &latency_tx);
    drop(latency_tx);

    let duration = Duration::from_secs(args.duration_seconds);
    let mut publishers = Vec::new();
    if args.publish_rate > 0.0 {
        let count = args.publishers.max(1);
        let rate = args.publish_rate / count as f64;
        let per_publisher = (rate * duration.as_secs_f64()).ceil() as u64;
        for _ in 0..count {
            let client = target.connect(None).await?;
            let (room, pad) = (args.room.clone(), args.payload_bytes);
            publishers.push(tokio::spawn(async move {
                loadgen::publish_paced(client, &room, rate, per_publisher, pad).await
            }));
        }
    }

    let mut total = Histogram::<u64>::new(3)?;
    let mut window = Histogram::<u64>::new(3)?;
    let mut last = 0;
    let run = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    while run.elapsed() < duration {
        ticks.tick().await;
        while let Ok(micros) = latency_rx.try_recv() {
            window.record(micros.max(1))?;
        }
        total.add(&window)?;
        let delivered = stats.deliveries.load(Ordering::Relaxed);
        println!(
            "t={:>4}s deliveries/s={:>9} latency p50={:.2}ms p99={:.2}ms closed={}",
            run.elapsed().as_secs(),
            delivered - last,
            window.value_at_quantile(0.5) as f64 / 1000.0,
            window.value_at_quantile(0.99) as f64 / 1000.0,
            stats.closed.load(Ordering::Relaxed),
        );
        last = delivered;
        window.reset();
    }
    for publisher in publishers {
        match publisher.await? {
            Ok(acked) => println!("publisher: {acked} publications acknowledged"),
            Err(error) => println!("publisher failed: {error}"),
        }
    }
    let delivered = stats.deliveries.load(Ordering::Relaxed);
    println!(
        "total: {delivered} deliveries, {:.0}/s; latency p50={:.2}ms p99={:.2}ms max={:.2}ms; {} connections closed",
        delivered as f64 / run.elapsed().as_secs_f64(),
        total.value_at_quantile(0.5) as f64 / 1000.0,
        total.value_at_quantile(0.99) as f64 / 1000.0,
        total.max() as f64 / 1000.0,
        stats.closed.load(Ordering::Relaxed),
    );
    Ok(())
}
