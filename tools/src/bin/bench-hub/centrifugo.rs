//! Centrifugo, the hub's peer in the benchmark: its server started from the binary
//! `dev/tools.sh install centrifugo` builds, and a client of its JSON protocol (connect with a
//! JWT, subscribe, publish, read pushes) over the same kind of socket the hub's clients use.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use ws_hub::loadgen::Stats;

/// A Centrifugo client connection.
pub type Client = WebSocketStream<TcpStream>;

/// One Centrifugo node.
pub struct Node {
    pub child: Child,
    pub port: u16,
    pub api_key: String,
}

/// Starts a node with the Redis engine (`redis_url`, keys under `prefix`), JWTs signed with
/// `secret`, history like the hub's (1000 publications, 120 s), clients allowed to subscribe to
/// and publish in channels without a namespace, logging at `info` as it ships.
pub fn spawn(
    binary: &Path,
    dir: &super::TempDir,
    name: &str,
    redis_url: &str,
    prefix: &str,
    secret: &str,
) -> anyhow::Result<Node> {
    let port = super::free_port()?;
    let api_key = uuid::Uuid::new_v4().simple().to_string();
    let config = serde_json::json!({
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "info"},
        "client": {"token": {"hmac_secret_key": secret}, "allowed_origins": ["*"]},
        "http_api": {"key": api_key},
        "channel": {"without_namespace": {
            "allow_subscribe_for_client": true,
            "allow_publish_for_client": true,
            "history_size": 1000,
            "history_ttl": "120s"
        }},
        "engine": {"type": "redis", "redis": {"address": [redis_url], "prefix": prefix}}
    });
    let path = dir.write(
        &format!("centrifugo-{name}.json"),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    let child = Command::new(binary)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    Ok(Node {
        child,
        port,
        api_key,
    })
}

impl Node {
    /// The node's resident memory in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        super::rss_kib(&self.child)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Connects (from `source` if given) and completes the `connect` command with `token`.
    pub async fn connect(&self, token: &str, source: Option<IpAddr>) -> anyhow::Result<Client> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(self.addr()).await?;
        stream.set_nodelay(true)?;
        let url = format!("ws://127.0.0.1:{}/connection/websocket", self.port);
        // The same small buffers as the hub's load generator.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut client, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        let connect = serde_json::json!({"id": 1, "connect": {"token": token}});
        client.send(Message::text(connect.to_string())).await?;
        reply(&mut client, 1, "connect").await?;
        Ok(client)
    }

    /// Connects and subscribes to `channel`.
    pub async fn subscribed(
        &self,
        token: &str,
        source: Option<IpAddr>,
        channel: &str,
    ) -> anyhow::Result<Client> {
        let mut client = self.connect(token, source).await?;
        let subscribe = serde_json::json!({"id": 2, "subscribe": {"channel": channel}});
        client.send(Message::text(subscribe.to_string())).await?;
        reply(&mut client, 2, "subscribe").await?;
        Ok(client)
    }

    /// Opens `count` subscribed connections, `concurrency` at a time, over `sources`.
    pub async fn open_subscribers(
        &self,
        token: &str,
        count: usize,
        channel: &str,
        sources: &[IpAddr],
        concurrency: usize,
    ) -> (Vec<Client>, Vec<anyhow::Error>) {
        ws_hub::loadgen::open_many(count, sources, concurrency, |source| {
            self.subscribed(token, source, channel)
        })
        .await
    }

    /// Publishes `data` to `channel` through the server API.
    pub async fn api_publish(
        &self,
        http: &reqwest::Client,
        channel: &str,
        data: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let response = http
            .post(format!("http://127.0.0.1:{}/api/publish", self.port))
            .header("X-API-Key", &self.api_key)
            .json(&serde_json::json!({"channel": channel, "data": data}))
            .send()
            .await?
            .error_for_status()?;
        let body: serde_json::Value = response.json().await?;
        if body.get("error").is_some() {
            bail!("publish refused: {body}");
        }
        Ok(())
    }
}

/// Reads until the reply to command `id` (which must carry `kind`); an `error` fails.
async fn reply(client: &mut Client, id: u64, kind: &str) -> anyhow::Result<()> {
    while let Some(message) = client.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        // Several replies may share a frame, one JSON object per line.
        for line in text.as_str().lines() {
            let value: serde_json::Value = serde_json::from_str(line)?;
            if value["id"] == id {
                if value.get("error").is_some() {
                    bail!("Centrifugo refused {kind}: {value}");
                }
                if value.get(kind).is_some() {
                    return Ok(());
                }
            }
        }
    }
    bail!("closed before the {kind} reply")
}

/// Reads every connection until it ends, counting pushed publications (and answering the
/// server's pings); the first `samplers` also report each publication's latency (µs, from its
/// `data.sentAt`).
pub fn spawn_readers(
    clients: Vec<Client>,
    stats: &Arc<Stats>,
    samplers: usize,
    latencies: &mpsc::UnboundedSender<u64>,
) {
    for (i, mut client) in clients.into_iter().enumerate() {
        let stats = stats.clone();
        let latencies = (i < samplers).then(|| latencies.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = client.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let text = text.as_str();
                if text.trim() == "{}" {
                    // A ping: the bidirectional protocol wants a pong.
                    if client.send(Message::text("{}")).await.is_err() {
                        break;
                    }
                    continue;
                }
                for line in text.lines().filter(|l| l.starts_with(r#"{"push":{"#)) {
                    if !line.contains(r#""pub":"#) {
                        continue;
                    }
                    stats.deliveries.fetch_add(1, Ordering::Relaxed);
                    if let Some(latencies) = &latencies {
                        let sent = serde_json::from_str::<serde_json::Value>(line)
                            .ok()
                            .and_then(|v| v["push"]["pub"]["data"]["sentAt"].as_u64());
                        if let Some(sent) = sent {
                            let _ =
                                latencies.send(common::rooms::now_micros().saturating_sub(sent));
                        }
                    }
                }
            }
            stats.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// Publishes `count` timed payloads to `channel` at `rate` per second over `client` (its own
/// `publish` commands); returns how many were acknowledged.
pub async fn publish_paced(
    client: Client,
    channel: &str,
    rate: f64,
    count: u64,
    pad: usize,
) -> anyhow::Result<u64> {
    let (mut sink, mut stream) = client.split();
    let acks = tokio::spawn(async move {
        let mut acked = 0_u64;
        while let Some(Ok(Message::Text(text))) = stream.next().await {
            acked += text
                .as_str()
                .lines()
                .filter(|l| l.contains(r#""publish":{"#))
                .count() as u64;
            if acked >= count {
                break;
            }
        }
        acked
    });
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for id in 0..count {
        ticks.tick().await;
        let publish = serde_json::json!({
            "id": id + 10,
            "publish": {"channel": channel, "data": ws_hub::loadgen::timed_payload(pad)}
        });
        sink.send(Message::text(publish.to_string())).await?;
    }
    let acked = tokio::time::timeout(Duration::from_secs(10), acks)
        .await
        .context("publications not acknowledged within 10 s")??;
    let _ = sink.close().await;
    Ok(acked)
}

/// Waits until the node accepts a subscription.
pub async fn wait_subscribable(node: &Node, token: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match node.subscribed(token, None, "bench_probe").await {
            Ok(_) => return Ok(()),
            Err(error) if tokio::time::Instant::now() > deadline => {
                bail!("Centrifugo not ready: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
