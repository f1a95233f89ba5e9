//! The node-wide room registry: which local connections joined which room, and the ONE Redis
//! pub/sub subscription per room that feeds them, however many local clients joined it.
//!
//! The first local member of a room subscribes to the room's channel (and waits for Redis to
//! confirm, so nothing published afterwards can be missed); the last one to leave
//! unsubscribes. A per-room gate serialises these transitions, so a join racing a leave
//! always ends subscribed. One task reads the pub/sub connection and fans each publication
//! out to the room's members through their bounded send queues: a member whose queue is
//! full is a slow consumer and is disconnected, the others are not delayed.
//!
//! When the pub/sub connection drops, the task reconnects with the shared backoff,
//! resubscribes every room, and fetches from each room's history what was published while
//! it was away (members drop duplicates by offset). A connection that dies without closing
//! (its peer vanished) is found by a periodic PING; each connect attempt is bounded, as a
//! SYN to an address that vanished is otherwise retried by the kernel for two minutes. The
//! registry is also a readiness [`Check`]: a node whose pub/sub connection is down cannot
//! serve joins, so it leaves the Service until it is back.
//!
//! On Redis Cluster (`REDIS_CLUSTER`) rooms are sharded channels: the node subscribes with
//! `SSUBSCRIBE` over a RESP3 cluster connection, each room on the shard that owns it, and the
//! publications arrive as pushes. That connection follows the slot map and resubscribes by
//! itself after a node's connection drops or a slot moves; a confirmation of a subscription
//! the room already had is that resubscription, and the room catches up from its history.
//! Every node is pinged periodically, so a connection that died silently is replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use backon::{ExponentialBuilder, Retryable as _};
use common::health::Check;
use common::metrics::{HUB_DELIVERIES_TOTAL, HUB_PUBLISH_DELIVER_SECONDS, HUB_ROOMS};
use common::rooms::{Position, Publication, Rooms};
use common::shutdown::CancellationToken;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use redis::aio::PubSubSink;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TrySendError;

use crate::NAME;
use crate::connection::{CloseReason, Control, Outbound};
use crate::protocol::Delivery;

/// How long one pub/sub connect attempt (TCP, TLS, AUTH, HELLO) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the pub/sub connection is pinged; an unanswered ping drops it.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// A room could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The pub/sub connection to Redis is down (it reconnects in the background).
    #[error("the hub is not connected to Redis")]
    Unavailable,
    /// Redis refused the subscription.
    #[error("failed to subscribe in Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A pub/sub connect attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("no connection within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Redis(redis::RedisError),
}

/// One connect attempt, bounded by [`CONNECT_TIMEOUT`].
async fn bounded<T>(
    attempt: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| ConnectError::TimedOut(CONNECT_TIMEOUT))?
        .map_err(ConnectError::Redis)
}

/// One local member of a room: a connection's send queue and its control block.
#[derive(Clone)]
pub struct Member {
    /// The connection's bounded send queue.
    pub tx: tokio::sync::mpsc::Sender<Outbound>,
    /// Its control block (closing, liveness).
    pub control: Arc<Control>,
}

struct Room {
    name: Arc<str>,
    members: RwLock<HashMap<u64, Member>>,
    /// Whether the Redis subscription is in place; held across SUBSCRIBE/UNSUBSCRIBE.
    gate: tokio::sync::Mutex<bool>,
    /// The last position fanned out, to fill the gap after a pub/sub reconnect.
    last: Mutex<Option<Position>>,
}

/// Where the registry's subscriptions come from.
#[expect(
    clippy::large_enum_variant,
    reason = "made once per process and moved into the registry"
)]
pub enum Source {
    /// One Redis: a pub/sub connection from this client.
    Single(redis::Client),
    /// Redis Cluster: a RESP3 connection from this client, whose pushes (publications,
    /// confirmations, disconnections) arrive on the receiver.
    Cluster(ClusterClient, UnboundedReceiver<PushInfo>),
}

impl Source {
    /// The source `config` describes.
    ///
    /// # Errors
    /// When the configuration is invalid.
    pub fn for_config(
        config: &common::config::RedisConfig,
    ) -> Result<Self, common::redis::RedisError> {
        if config.redis_cluster {
            let (client, pushes) = common::redis::cluster_pubsub_for(config)?;
            Ok(Self::Cluster(client, pushes))
        } else {
            Ok(Self::Single(common::redis::client_for(config)?))
        }
    }
}

/// The subscribing half of the current pub/sub connection.
#[derive(Clone)]
enum Sink {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channel: String) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.subscribe(channel).await,
            Self::Cluster(conn) => conn.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: String) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.unsubscribe(channel).await,
            Self::Cluster(conn) => conn.sunsubscribe(channel).await,
        }
    }
}

struct Inner {
    rooms: Rooms,
    source: Mutex<Option<Source>>,
    /// How long a ping may go unanswered (`REDIS_TIMEOUT_MS`).
    timeout: Duration,
    map: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    sink: Mutex<Option<Sink>>,
}

/// The node's rooms. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// A registry reading room channels through its own pub/sub connection from `source`,
    /// which is dropped when a ping goes unanswered for `timeout`.
    pub fn new(rooms: Rooms, source: Source, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                rooms,
                source: Mutex::new(Some(source)),
                timeout,
                map: Mutex::default(),
                sink: Mutex::default(),
            }),
        }
    }

    /// The room API (history, publishing).
    pub fn rooms(&self) -> &Rooms {
        &self.inner.rooms
    }

    /// Rooms with at least one local member (each has one Redis subscription).
    pub fn room_count(&self) -> usize {
        lock(&self.inner.map).len()
    }

    /// Adds connection `id` to `room`; returns once the node's Redis subscription to the
    /// room is confirmed, so every publication from now on reaches the member.
    pub async fn join(&self, room: &str, id: u64, member: Member) -> Result<(), JoinError> {
        let entry = {
            let mut map = lock(&self.inner.map);
            let entry = map
                .entry(Arc::from(room))
                .or_insert_with_key(|name| {
                    Arc::new(Room {
                        name: name.clone(),
                        members: RwLock::default(),
                        gate: tokio::sync::Mutex::new(false),
                        last: Mutex::default(),
                    })
                })
                .clone();
            entry
                .members
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, member);
            metrics::gauge!(HUB_ROOMS, "service" => NAME).set(map.len() as f64);
            entry
        };
        let mut subscribed = entry.gate.lock().await;
        if !*subscribed {
            let sink = lock(&self.inner.sink).clone();
            let result = match sink {
                Some(mut sink) => sink
                    .subscribe(self.inner.rooms.channel(room))
                    .await
                    .map_err(JoinError::from),
                None => Err(JoinError::Unavailable),
            };
            if let Err(error) = result {
                drop(subscribed);
                self.leave(room, id).await;
                return Err(error);
            }
            *subscribed = true;
        }
        Ok(())
    }

    /// Records a room position read by a joining client, so that a pub/sub reconnect can
    /// catch up from it even before the room's first live publication.
    pub fn observed(&self, room: &str, position: &Position) {
        if let Some(entry) = lock(&self.inner.map).get(room) {
            lock(&entry.last).get_or_insert_with(|| position.clone());
        }
    }

    /// Removes connection `id` from `room`; the last member out unsubscribes the node.
    pub async fn leave(&self, room: &str, id: u64) {
        let Some(entry) = lock(&self.inner.map).get(room).cloned() else {
            return;
        };
        let empty = {
            let mut members = entry
                .members
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            members.remove(&id);
            members.is_empty()
        };
        if !empty {
            return;
        }
        let mut subscribed = entry.gate.lock().await;
        let still_empty = || {
            entry
                .members
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        };
        if *subscribed && still_empty() {
            let sink = lock(&self.inner.sink).clone();
            if let Some(mut sink) = sink
                && let Err(error) = sink.unsubscribe(self.inner.rooms.channel(room)).await
            {
                // The subscription dies with the connection anyway; a reconnect only
                // resubscribes rooms that still have members.
                tracing::warn!(%error, room, "Failed to unsubscribe a room channel.");
            }
            *subscribed = false;
        }
        // Joins add members under the map lock, so this check and the removal are atomic
        // with respect to them.
        let mut map = lock(&self.inner.map);
        if !*subscribed
            && still_empty()
            && map
                .get(room)
                .is_some_and(|current| Arc::ptr_eq(current, &entry))
        {
            map.remove(room);
        }
        metrics::gauge!(HUB_ROOMS, "service" => NAME).set(map.len() as f64);
    }

    /// Reads the room channels until `shutdown`, reconnecting (and catching up from
    /// history) whenever the pub/sub connection drops or stops answering pings.
    pub async fn run(self, shutdown: CancellationToken) {
        let source = lock(&self.inner.source).take();
        match source {
            Some(Source::Single(client)) => self.run_single(client, shutdown).await,
            Some(Source::Cluster(client, pushes)) => {
                self.run_cluster(client, pushes, shutdown).await;
            }
            None => tracing::error!("The room registry is already running."),
        }
    }

    async fn run_cluster(
        self,
        client: ClusterClient,
        mut pushes: UnboundedReceiver<PushInfo>,
        shutdown: CancellationToken,
    ) {
        let connected = common::retry::until_connected(NAME, "redis-pubsub", &shutdown, || {
            let client = client.clone();
            async move { bounded(client.get_async_connection()).await }
        })
        .await;
        let Some(mut conn) = connected else {
            return;
        };
        *lock(&self.inner.sink) = Some(Sink::Cluster(conn.clone()));
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                push = pushes.recv() => match push {
                    Some(push) => self.on_push(push),
                    None => return,
                },
                _ = ping.tick() => {
                    // Every node, over the connections that carry the subscriptions: one that
                    // died silently fails here, and the cluster connection replaces it (and
                    // resubscribes its channels).
                    let mut cmd = redis::cmd("PING");
                    cmd.arg("hub");
                    let routing = redis::cluster_routing::RoutingInfo::MultiNode((
                        redis::cluster_routing::MultipleNodeRoutingInfo::AllNodes,
                        None,
                    ));
                    match tokio::time::timeout(self.inner.timeout, conn.route_command(cmd, routing)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "A Redis Cluster node did not answer PING."),
                        Err(_) => tracing::warn!(timeout_ms = self.inner.timeout.as_millis() as u64, "A Redis Cluster node did not answer PING in time."),
                    }
                }
            }
        }
    }

    /// A push from the cluster connection: a publication, or a (re)subscription.
    fn on_push(&self, push: PushInfo) {
        let text = |value: Option<&redis::Value>| match value {
            Some(redis::Value::BulkString(bytes)) => {
                std::str::from_utf8(bytes).ok().map(str::to_owned)
            }
            _ => None,
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let (Some(channel), Some(redis::Value::BulkString(frame))) =
                    (text(push.data.first()), push.data.get(1))
                else {
                    return;
                };
                self.fan_out_message(&channel, frame);
            }
            PushKind::SSubscribe => {
                // A confirmation: the node's first subscription to the room (nothing to catch
                // up, or a harmless repeat: members drop duplicates by offset), or the
                // connection resubscribing after it was replaced.
                let Some(channel) = text(push.data.first()) else {
                    return;
                };
                let Some(name) = self.inner.rooms.room_of_channel(&channel) else {
                    return;
                };
                let Some(room) = lock(&self.inner.map).get(name).cloned() else {
                    return;
                };
                if lock(&room.last).is_some() {
                    let registry = self.clone();
                    tokio::spawn(async move { registry.catch_up(&room).await });
                }
            }
            PushKind::Disconnection => {
                tracing::warn!(
                    "A Redis Cluster pub/sub connection dropped; it reconnects and resubscribes."
                );
            }
            _ => {}
        }
    }

    async fn run_single(self, client: redis::Client, shutdown: CancellationToken) {
        let mut first = true;
        loop {
            let client = client.clone();
            let connected = common::retry::until_connected(NAME, "redis-pubsub", &shutdown, || {
                let client = client.clone();
                async move { bounded(client.get_async_pubsub()).await }
            })
            .await;
            let Some(pubsub) = connected else {
                return;
            };
            let (sink, mut stream) = pubsub.split();
            *lock(&self.inner.sink) = Some(Sink::Single(sink.clone()));
            if !first {
                tracing::info!("Reconnected to Redis pub/sub; resubscribing rooms.");
                self.resubscribe(sink.clone()).await;
            }
            first = false;
            let mut ping = tokio::time::interval(PING_INTERVAL);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.reset();
            let lost = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    message = stream.next() => match message {
                        Some(message) => self.fan_out_message(
                            message.get_channel_name(),
                            message.get_payload_bytes(),
                        ),
                        None => break "the connection closed".to_owned(),
                    },
                    _ = ping.tick() => {
                        if let Err(why) = self.ping(sink.clone()).await {
                            break why;
                        }
                    }
                }
            };
            tracing::warn!(reason = %lost, "Lost the Redis pub/sub connection; reconnecting.");
            *lock(&self.inner.sink) = None;
            for room in self.snapshot() {
                *room.gate.lock().await = false;
            }
        }
    }

    /// Pings Redis over the pub/sub connection; the error says why it is considered lost.
    async fn ping(&self, mut sink: PubSubSink) -> Result<(), String> {
        match tokio::time::timeout(self.inner.timeout, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("PING failed: {error}")),
            Err(_) => Err(format!(
                "PING unanswered for {} ms",
                self.inner.timeout.as_millis()
            )),
        }
    }

    fn snapshot(&self) -> Vec<Arc<Room>> {
        lock(&self.inner.map).values().cloned().collect()
    }

    async fn resubscribe(&self, sink: PubSubSink) {
        let mut sink = Sink::Single(sink);
        for room in self.snapshot() {
            let mut subscribed = room.gate.lock().await;
            let has_members = !room
                .members
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
            if *subscribed || !has_members {
                continue;
            }
            if let Err(error) = sink.subscribe(self.inner.rooms.channel(&room.name)).await {
                tracing::warn!(%error, room = &*room.name, "Failed to resubscribe a room.");
                continue;
            }
            *subscribed = true;
            drop(subscribed);
            self.catch_up(&room).await;
        }
    }

    /// Delivers what was published to `room` while the pub/sub connection was down.
    async fn catch_up(&self, room: &Room) {
        let Some(last) = lock(&room.last).clone() else {
            return;
        };
        // The command connection was probably cut too and reconnects on first use: retry a
        // few times before giving up on the gap.
        let recovered = (|| self.inner.rooms.recover(&room.name, &last))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(8),
            )
            .sleep(tokio::time::sleep)
            .await;
        match recovered {
            Ok(recovery) => match recovery.publications {
                Some(publications) => {
                    for publication in publications {
                        self.fan_out(room, publication);
                    }
                }
                None => tracing::warn!(
                    room = &*room.name,
                    "Publications missed during a Redis outage are no longer in the history."
                ),
            },
            Err(error) => {
                tracing::warn!(%error, room = &*room.name, "Failed to catch up a room.");
            }
        }
    }

    fn fan_out_message(&self, channel: &str, frame: &[u8]) {
        let Some(name) = self.inner.rooms.room_of_channel(channel) else {
            return;
        };
        let Some(room) = lock(&self.inner.map).get(name).cloned() else {
            return;
        };
        match Publication::decode(Bytes::copy_from_slice(frame)) {
            Ok(publication) => self.fan_out(&room, publication),
            Err(error) => tracing::warn!(%error, room = name, "Dropped a malformed room frame."),
        }
    }

    fn fan_out(&self, room: &Room, publication: Publication) {
        // A span per publication (not per client) that continues the publisher's trace, when
        // the publication carries a sampled one: an untraced fan-out costs nothing extra.
        let span = publication
            .trace_parent
            .as_deref()
            .and_then(common::telemetry::sampled_context)
            .map(|cx| {
                let span = tracing::info_span!(
                    "hub.fan_out",
                    otel.kind = "consumer",
                    room = &*room.name,
                    offset = publication.offset,
                    recipients = tracing::field::Empty,
                );
                common::telemetry::set_parent(&span, cx);
                span
            });
        let published_at = publication.published_at_micros;
        *lock(&room.last) = Some(Position {
            epoch: publication.epoch.clone(),
            offset: publication.offset,
        });
        let delivery = Arc::new(Delivery::new(room.name.clone(), publication));
        let mut delivered = 0_u64;
        {
            let members = room.members.read().unwrap_or_else(PoisonError::into_inner);
            for member in members.values() {
                match member.tx.try_send(Outbound::Publication(delivery.clone())) {
                    Ok(()) => delivered += 1,
                    Err(TrySendError::Full(_)) => {
                        member.control.close(CloseReason::SlowConsumer);
                    }
                    Err(TrySendError::Closed(_)) => {}
                }
            }
        }
        if let Some(span) = span {
            span.record("recipients", delivered);
        }
        metrics::counter!(HUB_DELIVERIES_TOTAL, "service" => NAME).increment(delivered);
        let latency = common::rooms::now_micros().saturating_sub(published_at);
        metrics::histogram!(HUB_PUBLISH_DELIVER_SECONDS, "service" => NAME)
            .record(Duration::from_micros(latency).as_secs_f64());
    }
}

/// Ready while the pub/sub connection is up: joins need it.
impl Check for Registry {
    fn name(&self) -> &'static str {
        "redis-pubsub"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let connected = lock(&self.inner.sink).is_some();
        Box::pin(async move {
            if connected {
                Ok(())
            } else {
                Err("the pub/sub connection is down; reconnecting".to_owned())
            }
        })
    }
}
