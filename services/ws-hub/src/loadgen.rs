//! The client side of the hub, as the load generator (`meridian-loadgen`) and the benchmark
//! (`bench-hub`) use it: connect with a token (optionally from a given source address, to
//! open more connections than one address has ephemeral ports), subscribe, publish, and
//! classify what arrives. Plain `ws://` only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::protocol::{PROTOCOL_JSON, PROTOCOL_MSGPACK};

/// A client connection.
pub type Client = WebSocketStream<TcpStream>;

/// A load-generator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The URL is not a usable `ws://host:port/path` URL.
    #[error("invalid hub URL: {0}")]
    Url(String),
    /// TCP failed.
    #[error("failed to connect: {0}")]
    Io(#[from] std::io::Error),
    /// The WebSocket handshake or a frame failed.
    #[error("WebSocket error: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The hub answered something else than expected.
    #[error("unexpected answer from the hub: {0}")]
    Unexpected(String),
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://host:port/ws`.
    pub url: url::Url,
    /// The hub's resolved socket address.
    pub addr: SocketAddr,
    /// Access token sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Ask for MessagePack frames instead of JSON.
    pub msgpack: bool,
}

impl Target {
    /// Resolves `url` once.
    pub async fn new(url: &str, token: Option<String>, msgpack: bool) -> Result<Self, LoadError> {
        let url = url::Url::parse(url).map_err(|e| LoadError::Url(e.to_string()))?;
        if url.scheme() != "ws" {
            return Err(LoadError::Url("only ws:// URLs are supported".into()));
        }
        let host = url
            .host_str()
            .ok_or_else(|| LoadError::Url("no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| LoadError::Url(format!("{host} does not resolve")))?;
        Ok(Self {
            url,
            addr,
            token,
            msgpack,
        })
    }

    /// Opens one connection, from `source` if given.
    pub async fn connect(&self, source: Option<IpAddr>) -> Result<Client, LoadError> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let mut request = self.url.as_str().into_client_request()?;
        let headers = request.headers_mut();
        let protocol = if self.msgpack {
            PROTOCOL_MSGPACK
        } else {
            PROTOCOL_JSON
        };
        headers.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| LoadError::Url(format!("token is not a header value: {e}")))?;
            headers.insert("authorization", value);
        }
        // Small buffers: the load generator holds tens of thousands of these.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (client, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        Ok(client)
    }
}

/// The JSON `subscribe` frame.
pub fn subscribe_frame(room: &str) -> Message {
    Message::text(serde_json::json!({"type": "subscribe", "room": room}).to_string())
}

/// The JSON `publish` frame carrying `data`.
pub fn publish_frame(room: &str, data: &serde_json::Value) -> Message {
    Message::text(serde_json::json!({"type": "publish", "room": room, "data": data}).to_string())
}

/// Reads text frames until one has `type` = `kind`; returns it. Errors on `error` frames.
pub async fn expect_json(client: &mut Client, kind: &str) -> Result<serde_json::Value, LoadError> {
    while let Some(message) = client.next().await {
        if let Message::Text(text) = message? {
            let value: serde_json::Value = serde_json::from_str(text.as_str())
                .map_err(|e| LoadError::Unexpected(e.to_string()))?;
            if value["type"] == kind {
                return Ok(value);
            }
            if value["type"] == "error" {
                return Err(LoadError::Unexpected(value.to_string()));
            }
        }
    }
    Err(LoadError::Unexpected(format!("closed before `{kind}`")))
}

/// Connects and subscribes to `room` (JSON encoding); returns once `subscribed` arrived.
pub async fn subscribed(
    target: &Target,
    source: Option<IpAddr>,
    room: &str,
) -> Result<Client, LoadError> {
    let mut client = target.connect(source).await?;
    client.send(subscribe_frame(room)).await?;
    expect_json(&mut client, "subscribed").await?;
    Ok(client)
}

/// Whether a text frame is a `publication` (a cheap prefix check, no parsing).
pub fn is_publication(message: &Message) -> bool {
    matches!(message, Message::Text(text) if text.as_str().starts_with(r#"{"type":"publication""#))
}

/// Counters shared by the reading tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Publications received.
    pub deliveries: AtomicU64,
    /// Connections that ended.
    pub closed: AtomicU64,
}

/// Opens `count` connections subscribed to `room`, `concurrency` at a time, spreading them
/// over `sources` (local addresses; empty: the system's choice). Returns the connections and
/// the failures.
pub async fn open_subscribers(
    target: &Target,
    count: usize,
    room: &str,
    sources: &[IpAddr],
    concurrency: usize,
) -> (Vec<Client>, Vec<LoadError>) {
    open_many(count, sources, concurrency, |source| {
        subscribed(target, source, room)
    })
    .await
}

/// Runs `open` `count` times, `concurrency` at a time, each with the next of `sources` (local
/// addresses; empty: `None`, the system's choice). Returns what opened and the failures.
pub async fn open_many<C, E, F, Fut>(
    count: usize,
    sources: &[IpAddr],
    concurrency: usize,
    open: F,
) -> (Vec<C>, Vec<E>)
where
    F: Fn(Option<IpAddr>) -> Fut,
    Fut: Future<Output = Result<C, E>>,
{
    let results: Vec<Result<C, E>> = futures::stream::iter(0..count)
        .map(|i| open((!sources.is_empty()).then(|| sources[i % sources.len()])))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let (mut clients, mut failures) = (Vec::new(), Vec::new());
    for result in results {
        match result {
            Ok(client) => clients.push(client),
            Err(error) => failures.push(error),
        }
    }
    (clients, failures)
}

/// Reads every connection until it ends, counting publications; the first `samplers`
/// connections also report each publication's latency (µs, from its `data.sentAt`).
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
                if !is_publication(&message) {
                    continue;
                }
                stats.deliveries.fetch_add(1, Ordering::Relaxed);
                if let (Some(latencies), Some(sent)) = (&latencies, sent_at(&message)) {
                    let _ = latencies.send(common::rooms::now_micros().saturating_sub(sent));
                }
            }
            stats.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// A JSON publication's `data.sentAt` (µs since the Unix epoch), if it has one.
pub fn sent_at(message: &Message) -> Option<u64> {
    let Message::Text(text) = message else {
        return None;
    };
    let value: serde_json::Value = serde_json::from_str(text.as_str()).ok()?;
    value["data"]["sentAt"].as_u64()
}

/// A payload carrying its send time and `pad` bytes of padding.
pub fn timed_payload(pad: usize) -> serde_json::Value {
    serde_json::json!({"sentAt": common::rooms::now_micros(), "pad": "x".repeat(pad)})
}

/// Publishes `count` timed payloads to `room` at `rate` per second over `client`;
/// returns how many the hub acknowledged with `published`.
pub async fn publish_paced(
    client: Client,
    room: &str,
    rate: f64,
    count: u64,
    pad: usize,
) -> Result<u64, LoadError> {
    let (mut sink, mut stream) = client.split();
    let acks = tokio::spawn(async move {
        let mut acked = 0_u64;
        while let Some(Ok(message)) = stream.next().await {
            if matches!(&message, Message::Text(t) if t.as_str().starts_with(r#"{"type":"published""#))
            {
                acked += 1;
                if acked == count {
                    break;
                }
            }
        }
        acked
    });
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..count {
        ticks.tick().await;
        sink.send(publish_frame(room, &timed_payload(pad))).await?;
    }
    let acked = tokio::time::timeout(Duration::from_secs(10), acks)
        .await
        .map_err(|_| LoadError::Unexpected("publications not acknowledged within 10 s".into()))?
        .map_err(|e| LoadError::Unexpected(e.to_string()))?;
    let _ = sink.close().await;
    Ok(acked)
}

/// Raises this process's open-files limit as far as allowed (the hard limit too, when
/// privileged); returns the soft limit now in force.
pub fn raise_open_files(wanted: u64) -> std::io::Result<u64> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if hard < wanted {
        // Only a privileged process may raise the hard limit; fall back to the soft one.
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, wanted);
    }
    rlimit::increase_nofile_limit(wanted)
}
