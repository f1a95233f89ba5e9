//! WebSocket connections: the upgrade (limits and auth before the handshake), then two tasks
//! per connection, a reader that handles requests and a writer that owns the socket's send
//! half and the connection's bounded send queue.
//!
//! - Every frame the hub sends goes through the send queue (`HUB_SEND_QUEUE` entries). The
//!   fan-out never waits: a full queue means a slow consumer, which is closed with 4000.
//! - Subscribing is race free: the writer is told a room is being joined, the node's Redis
//!   subscription is confirmed, then the history/position is read; live publications that
//!   arrive meanwhile are held and, like everything after, delivered only if newer than the
//!   last offset the client has (no gap, no duplicate).
//! - One node-wide task pings every connection each `HUB_PING_INTERVAL_SECONDS` and closes
//!   those silent for longer than that plus `HUB_PONG_TIMEOUT_SECONDS` (4001), or whose token
//!   expired (4003).
//! - On drain every client gets a `reconnect` notice (with a jittered delay) and close 1012.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::extract::State;
use axum::extract::ws::{
    CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::auth::Verifier;
use common::metrics::{
    HUB_CONNECTIONS, HUB_CONNECTIONS_REJECTED_TOTAL, HUB_DISCONNECTS_TOTAL,
    HUB_MESSAGES_REJECTED_TOTAL, HUB_PUBLICATIONS_TOTAL,
};
use common::problem::{Problem, ProblemType, retry_later};
use common::rooms::Position;
use common::shutdown::CancellationToken;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::NAME;
use crate::access::{Access, Patterns};
use crate::protocol::{
    Delivery, Encoding, PROTOCOL_JSON, PROTOCOL_MSGPACK, Reply, Request, reconnect_notice,
};
use crate::registry::{Member, Registry};

/// Why a connection was closed, with its close code (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or its socket failed (1000).
    Client,
    /// Its send queue overflowed (4000).
    SlowConsumer,
    /// It did not answer pings in time (4001).
    KeepaliveTimeout,
    /// It kept sending while rate limited (1008).
    RateLimited,
    /// It sent a message larger than `HUB_MAX_MESSAGE_BYTES` (1009).
    MessageTooBig,
    /// Its token expired (4003).
    TokenExpired,
    /// The node is shutting down (1012, after a `reconnect` notice).
    Draining,
    /// It broke the WebSocket protocol (1002).
    ProtocolError,
}

impl CloseReason {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Self::Client => 1000,
            Self::ProtocolError => 1002,
            Self::RateLimited => 1008,
            Self::MessageTooBig => 1009,
            Self::Draining => 1012,
            Self::SlowConsumer => 4000,
            Self::KeepaliveTimeout => 4001,
            Self::TokenExpired => 4003,
        }
    }

    /// The metric label and close-frame reason text.
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::SlowConsumer => "slow_consumer",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::RateLimited => "rate_limited",
            Self::MessageTooBig => "message_too_big",
            Self::TokenExpired => "token_expired",
            Self::Draining => "draining",
            Self::ProtocolError => "protocol_error",
        }
    }
}

/// What a connection's writer is asked to send. Kept to two words: every connection's queue
/// starts with a block of 32 of them.
#[derive(Debug)]
pub enum Outbound {
    /// A publication in one of its rooms.
    Publication(Arc<Delivery>),
    /// A room is being joined: hold its publications until `Reply::Subscribed` (boxed: a
    /// room's name is a two-word `Arc<str>`).
    Joining(Box<Arc<str>>),
    /// An answer to a request.
    Reply(Box<Reply>),
    /// A keepalive ping.
    Ping,
}

const _: () = assert!(std::mem::size_of::<Outbound>() == 16);

/// A connection's control block, shared by its tasks, the fan-out and the sweeper.
#[derive(Debug)]
pub struct Control {
    closed: CancellationToken,
    reason: OnceLock<CloseReason>,
    /// Milliseconds since the hub started when the client was last heard from.
    last_seen: AtomicU64,
    expires_at: Option<i64>,
}

impl Control {
    /// Asks the connection to close for `reason`; true if this was the first reason given.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.closed.cancel();
        first
    }

    fn reason(&self) -> CloseReason {
        self.reason.get().copied().unwrap_or(CloseReason::Client)
    }
}

/// Limits and policies of one hub node (from `HubConfig`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Connections this node accepts (`HUB_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Entries in each connection's send queue (`HUB_SEND_QUEUE`).
    pub send_queue: usize,
    /// Largest client message and frame (`HUB_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: usize,
    /// Keepalive ping period.
    pub ping_interval: Duration,
    /// How long past a ping period a silent client is kept.
    pub pong_timeout: Duration,
    /// Client messages per second (token refill rate).
    pub message_rate: f64,
    /// Client message burst (bucket size).
    pub message_burst: u32,
    /// Rooms one connection may join.
    pub max_rooms_per_connection: usize,
    /// Connections one token subject may hold on this node (0: no limit).
    pub max_connections_per_subject: usize,
    /// Connections one client address may hold on this node (0: no limit).
    pub max_connections_per_address: usize,
    /// Proxies in front of the hub that append to `X-Forwarded-For` (the client address is
    /// the entry they added; 0: the TCP peer).
    pub trusted_proxy_hops: usize,
    /// Rooms anonymous connections may join (empty: a token is required).
    pub anonymous_rooms: Patterns,
    /// Rooms clients may publish to (besides being allowed to subscribe).
    pub publish_rooms: Patterns,
    /// Upper bound of the random reconnect delay announced on drain.
    pub drain_jitter: Duration,
}

/// The node's connections and the services they use. Shared behind an `Arc`.
pub struct Hub {
    settings: Settings,
    registry: Registry,
    verifier: Verifier,
    connections: Mutex<HashMap<u64, Member>>,
    quotas: Mutex<Quotas>,
    open: AtomicUsize,
    next_id: AtomicU64,
    draining: AtomicBool,
    started: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Open connections per token subject and per client address on this node.
#[derive(Default)]
struct Quotas {
    subjects: HashMap<String, usize>,
    addresses: HashMap<IpAddr, usize>,
}

fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// A reserved connection slot (and the subject's and address's share), released when
/// dropped.
struct Slot {
    hub: Arc<Hub>,
    subject: Option<String>,
    address: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.subject.is_some() || self.address.is_some() {
            let mut quotas = lock(&self.hub.quotas);
            if let Some(subject) = &self.subject {
                release(&mut quotas.subjects, subject);
            }
            if let Some(address) = &self.address {
                release(&mut quotas.addresses, address);
            }
        }
        let open = self.hub.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(HUB_CONNECTIONS, "service" => NAME).set(open as f64);
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `HUB_MAX_CONNECTIONS`.
    Node,
    /// `HUB_MAX_CONNECTIONS_PER_SUBJECT`.
    Subject,
    /// `HUB_MAX_CONNECTIONS_PER_ADDRESS`.
    Address,
}

impl Hub {
    /// A hub node with `settings`, delivering through `registry`, verifying with `verifier`.
    pub fn new(settings: Settings, registry: Registry, verifier: Verifier) -> Arc<Self> {
        Arc::new(Self {
            settings,
            registry,
            verifier,
            connections: Mutex::default(),
            quotas: Mutex::default(),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// The room registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Open (and opening) connections.
    pub fn connection_count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn reserve(self: &Arc<Self>, subject: Option<&str>, address: IpAddr) -> Result<Slot, Refusal> {
        let settings = &self.settings;
        let full =
            |count: Option<&usize>, limit: usize| limit > 0 && count.copied().unwrap_or(0) >= limit;
        let mut quotas = lock(&self.quotas);
        if let Some(subject) = subject
            && full(
                quotas.subjects.get(subject),
                settings.max_connections_per_subject,
            )
        {
            return Err(Refusal::Subject);
        }
        if full(
            quotas.addresses.get(&address),
            settings.max_connections_per_address,
        ) {
            return Err(Refusal::Address);
        }
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let mut slot = Slot {
            hub: self.clone(),
            subject: None,
            address: None,
        };
        if open > settings.max_connections {
            // (The slot holds no quota yet, so dropping it does not take `quotas` again.)
            return Err(Refusal::Node);
        }
        if let Some(subject) = subject {
            *quotas.subjects.entry(subject.to_owned()).or_default() += 1;
            slot.subject = Some(subject.to_owned());
        }
        *quotas.addresses.entry(address).or_default() += 1;
        slot.address = Some(address);
        drop(quotas);
        metrics::gauge!(HUB_CONNECTIONS, "service" => NAME).set(open as f64);
        Ok(slot)
    }

    /// Refuses new connections and tells every client to reconnect elsewhere.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        let members: Vec<Member> = lock(&self.connections).values().cloned().collect();
        tracing::info!(
            connections = members.len(),
            "Draining WebSocket connections."
        );
        for member in members {
            member.control.close(CloseReason::Draining);
        }
    }

    /// Waits until every connection has closed, at most `grace`.
    pub async fn drained(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pings every connection periodically; closes the silent and the expired.
    pub async fn keepalive(self: Arc<Self>, shutdown: CancellationToken) {
        let period = self.settings.ping_interval;
        let allowed_silence = period + self.settings.pong_timeout;
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = self.now_ms();
            let unix_now =
                i64::try_from(common::rooms::now_micros() / 1_000_000).unwrap_or(i64::MAX);
            let members: Vec<Member> = lock(&self.connections).values().cloned().collect();
            for member in members {
                let silent = now.saturating_sub(member.control.last_seen.load(Ordering::Relaxed));
                if silent > u64::try_from(allowed_silence.as_millis()).unwrap_or(u64::MAX) {
                    member.control.close(CloseReason::KeepaliveTimeout);
                } else if member.control.expires_at.is_some_and(|exp| exp < unix_now) {
                    member.control.close(CloseReason::TokenExpired);
                } else {
                    // A full queue is the fan-out's business (slow consumer); skip the ping.
                    let _ = member.tx.try_send(Outbound::Ping);
                }
            }
        }
    }
}

/// Bytes read from a client's socket at a time (and its read buffer's initial size).
const READ_BUFFER_BYTES: usize = 512;

/// `GET /ws`: checks the token, then the node's limits, then upgrades.
pub async fn upgrade(
    State(hub): State<Arc<Hub>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            let status = rejection.status();
            return Problem::new(ProblemType::ValidationFailed, status)
                .detail(rejection.body_text())
                .into_response();
        }
    };
    if hub.draining.load(Ordering::Acquire) {
        metrics::counter!(HUB_CONNECTIONS_REJECTED_TOTAL, "service" => NAME, "reason" => "draining")
            .increment(1);
        return retry_later(
            ProblemType::ShuttingDown,
            "this hub node is shutting down; connect to another one",
        );
    }
    let access = match crate::access::token(uri.query(), &headers) {
        Some(token) => match hub.verifier.verify(&token).await {
            Ok(claims) => Access::from_claims(&claims),
            Err(error) if error.is_unavailable() => {
                tracing::warn!(%error, "Cannot verify a token.");
                return retry_later(
                    ProblemType::DependencyUnavailable,
                    "the token cannot be verified right now; retry later",
                );
            }
            Err(error) => return unauthorized(&error.to_string(), Some("invalid_token")),
        },
        None if !hub.settings.anonymous_rooms.is_empty() => {
            Access::anonymous(&hub.settings.anonymous_rooms)
        }
        None => {
            return unauthorized(
                "an access token is required (?token=, Authorization: Bearer, or a bearer.<token> subprotocol)",
                None,
            );
        }
    };
    // A slot only for a caller whose token checked out: a flood of bad tokens gets its 401s
    // and never makes the node answer 503 to anyone.
    let peer = connect.map_or(
        IpAddr::from([0, 0, 0, 0]),
        |Extension(ConnectInfo(peer))| peer.ip(),
    );
    let address = common::http::client_ip(peer, &headers, hub.settings.trusted_proxy_hops);
    let subject = access.authenticated.then_some(access.subject.as_str());
    let slot = match hub.reserve(subject, address) {
        Ok(slot) => slot,
        Err(refusal) => return refused(&hub.settings, refusal),
    };
    let ws = ws.protocols([PROTOCOL_MSGPACK, PROTOCOL_JSON]);
    let encoding = match ws.selected_protocol().map(HeaderValue::as_bytes) {
        Some(p) if p == PROTOCOL_MSGPACK.as_bytes() => Encoding::MessagePack,
        Some(_) => Encoding::Json,
        None => encoding_from_query(uri.query()),
    };
    let trace_context = query_flag(uri.query(), "trace");
    let max = hub.settings.max_message_bytes;
    // The connection outlives the upgrade request; its span is a child of the request's (and
    // so of the caller's `traceparent`). A debug span: a live span keeps its parent alive and
    // each carries its trace and log state, a few KiB per idle connection at `info`, where
    // the hub's memory per connection matters most. Publications get their own spans.
    let span = tracing::debug_span!("ws.connection", subject = %access.subject, ?encoding);
    // The read buffer lives as long as the connection, and clients mostly listen: 512 bytes
    // hold any subscribe request, and a larger frame grows the buffer to its size (read in
    // 512-byte steps). Written frames are batched up to 8 KiB per write.
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(8 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade({
            // The upgrade's task keeps its callback for good; boxed, what the callback
            // carries to `serve` takes one word there instead of ~250 bytes.
            let carried = Box::new((hub, access, slot, span));
            move |socket| {
                let (hub, access, slot, span) = *carried;
                serve(hub, socket, access, (encoding, trace_context), slot).instrument(span)
            }
        })
}

/// The answer to an upgrade a connection limit refuses, counted by the limit: 503 +
/// `Retry-After` when the node is full (another node may have room), 429 when the caller
/// holds its share already.
fn refused(settings: &Settings, refusal: Refusal) -> Response {
    let (reason, detail) = match refusal {
        Refusal::Node => {
            metrics::counter!(HUB_CONNECTIONS_REJECTED_TOTAL, "service" => NAME, "reason" => "connection_limit")
                .increment(1);
            return retry_later(
                ProblemType::CapacityExceeded,
                format!(
                    "this hub node has reached its limit of {} connections; retry later",
                    settings.max_connections
                ),
            );
        }
        Refusal::Subject => (
            "subject_limit",
            format!(
                "this token's subject already holds {} connections to this hub node",
                settings.max_connections_per_subject
            ),
        ),
        Refusal::Address => (
            "address_limit",
            format!(
                "this address already holds {} connections to this hub node",
                settings.max_connections_per_address
            ),
        ),
    };
    metrics::counter!(HUB_CONNECTIONS_REJECTED_TOTAL, "service" => NAME, "reason" => reason)
        .increment(1);
    Problem::new(ProblemType::RateLimited, StatusCode::TOO_MANY_REQUESTS)
        .detail(detail)
        .into_response()
}

/// 401 with a bearer challenge (RFC 6750), counted as a rejected connection.
fn unauthorized(detail: &str, error: Option<&str>) -> Response {
    metrics::counter!(HUB_CONNECTIONS_REJECTED_TOTAL, "service" => NAME, "reason" => "unauthorized")
        .increment(1);
    common::problem::unauthorized(detail, error)
}

/// Whether the query has `name=1` or `name=true`.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| k == name && (v == "1" || v == "true"))
    })
}

fn encoding_from_query(query: Option<&str>) -> Encoding {
    let requested = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "encoding")
            .map(|(_, v)| v.into_owned())
    });
    match requested.as_deref() {
        Some("msgpack" | "messagepack") => Encoding::MessagePack,
        _ => Encoding::Json,
    }
}

/// Sets a connection up — its send queue, its writer task, its entry in the node's table —
/// and returns what the upgrade's task runs from then on: the reader. `format`: the
/// connection's encoding, and whether publications carry their `traceparent`.
///
/// An idle connection is its two parked tasks, so their futures are kept small: what is set
/// up here never lives in them, and what they do only now and then (handle a request, write a
/// batch, say goodbye) is boxed for its duration rather than reserved in every connection.
fn serve(
    hub: Arc<Hub>,
    socket: WebSocket,
    access: Access,
    format: (Encoding, bool),
    slot: Slot,
) -> impl Future<Output = ()> + Send + 'static {
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(hub.settings.send_queue.max(1));
    let control = Arc::new(Control {
        closed: CancellationToken::new(),
        reason: OnceLock::new(),
        last_seen: AtomicU64::new(hub.now_ms()),
        expires_at: access.expires_at,
    });
    let member = Member {
        tx: tx.clone(),
        control: control.clone(),
    };
    lock(&hub.connections).insert(id, member);
    if hub.draining.load(Ordering::Acquire) {
        control.close(CloseReason::Draining);
    }
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        control.clone(),
        format,
        hub.settings.send_queue,
        hub.settings.drain_jitter,
    ));
    let session = Session {
        bucket: Bucket::new(hub.settings.message_rate, hub.settings.message_burst),
        hub,
        id,
        tx,
        control,
        access,
        rooms: HashSet::new(),
        refused_in_a_row: 0,
    };
    session.run(stream, writer, slot)
}

/// A token bucket: `rate` tokens per second, at most `burst`.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The reader side of one connection.
struct Session {
    hub: Arc<Hub>,
    id: u64,
    tx: mpsc::Sender<Outbound>,
    control: Arc<Control>,
    access: Access,
    rooms: HashSet<Arc<str>>,
    bucket: Bucket,
    refused_in_a_row: u32,
}

/// Longest room name accepted.
const MAX_ROOM_LEN: usize = 256;

impl Session {
    /// Reads until the connection closes, then cleans up after it.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps its arguments twice: 912 bytes per connection instead of 576 (debug)"
    )]
    fn run(
        mut self,
        stream: SplitStream<WebSocket>,
        writer: JoinHandle<()>,
        slot: Slot,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            self.read_loop(stream).await;
            Box::pin(self.close(writer, slot)).await;
        }
    }

    /// Leaves the rooms, stops the writer (which sends the close frame), forgets the
    /// connection and releases its slot.
    async fn close(mut self, writer: JoinHandle<()>, slot: Slot) {
        for room in std::mem::take(&mut self.rooms) {
            self.hub.registry.leave(&room, self.id).await;
        }
        self.control.close(CloseReason::Client);
        let _ = writer.await;
        lock(&self.hub.connections).remove(&self.id);
        let reason = self.control.reason();
        metrics::counter!(HUB_DISCONNECTS_TOTAL, "service" => NAME, "reason" => reason.label())
            .increment(1);
        if matches!(reason, CloseReason::SlowConsumer | CloseReason::RateLimited) {
            tracing::info!(reason = reason.label(), subject = %self.access.subject, "Disconnected a client.");
        }
        drop(slot);
    }

    async fn read_loop(&mut self, mut stream: SplitStream<WebSocket>) {
        loop {
            let next = tokio::select! {
                biased;
                () = self.control.closed.cancelled() => return,
                next = stream.next() => next,
            };
            let message = match next {
                None | Some(Ok(Message::Close(_))) => return,
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    self.control.close(read_error_reason(&error));
                    return;
                }
            };
            self.control
                .last_seen
                .store(self.hub.now_ms(), Ordering::Relaxed);
            let request = match &message {
                Message::Text(text) => Request::from_json(text.as_str()),
                Message::Binary(bytes) => Request::from_msgpack(bytes),
                _ => continue,
            };
            if !self.bucket.take() {
                self.refused_in_a_row += 1;
                if self.refused_in_a_row > self.hub.settings.message_burst {
                    self.control.close(CloseReason::RateLimited);
                    return;
                }
                let reference = request.as_ref().ok().and_then(Request::reference);
                self.error(
                    "rate-limited",
                    "too many messages; slow down".into(),
                    None,
                    reference,
                );
                continue;
            }
            self.refused_in_a_row = 0;
            match request {
                Ok(request) => Box::pin(self.handle(request)).await,
                Err(message) => self.error("bad-request", message, None, None),
            }
        }
    }

    /// Queues a frame; a full queue makes this a slow consumer.
    fn send(&self, outbound: Outbound) -> bool {
        match self.tx.try_send(outbound) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.control.close(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn error(
        &self,
        code: &'static str,
        message: String,
        room: Option<&str>,
        reference: Option<u64>,
    ) {
        metrics::counter!(HUB_MESSAGES_REJECTED_TOTAL, "service" => NAME, "code" => code)
            .increment(1);
        self.send(Outbound::Reply(Box::new(Reply::Error {
            code,
            message,
            room: room.map(str::to_owned),
            reference,
        })));
    }

    async fn handle(&mut self, request: Request) {
        let reference = request.reference();
        let room = request.room();
        if room.is_empty() || room.len() > MAX_ROOM_LEN || room.chars().any(char::is_control) {
            let message = format!(
                "a room name has 1 to {MAX_ROOM_LEN} characters, none of them control characters"
            );
            self.error("bad-request", message, None, reference);
            return;
        }
        match request {
            Request::Subscribe {
                room,
                recover,
                reference,
            } => {
                self.subscribe(room, recover.map(Position::from), reference)
                    .await;
            }
            Request::Unsubscribe { room, reference } => {
                let Some(name) = self.rooms.take(room.as_str()) else {
                    self.error(
                        "not-subscribed",
                        "not subscribed to this room".into(),
                        Some(&room),
                        reference,
                    );
                    return;
                };
                self.hub.registry.leave(&name, self.id).await;
                self.send(Outbound::Reply(Box::new(Reply::Unsubscribed {
                    room: name,
                    reference,
                })));
            }
            Request::Publish {
                room,
                payload,
                reference,
            } => {
                self.publish(room, payload, reference).await;
            }
        }
    }

    async fn subscribe(&mut self, room: String, recover: Option<Position>, reference: Option<u64>) {
        if !self.access.can_subscribe(&room) {
            self.error(
                "forbidden",
                "the token does not allow this room".into(),
                Some(&room),
                reference,
            );
            return;
        }
        if self.rooms.contains(room.as_str()) {
            self.error(
                "already-subscribed",
                "already subscribed to this room".into(),
                Some(&room),
                reference,
            );
            return;
        }
        if self.rooms.len() >= self.hub.settings.max_rooms_per_connection {
            let message = format!(
                "at most {} rooms per connection",
                self.hub.settings.max_rooms_per_connection
            );
            self.error("too-many-rooms", message, Some(&room), reference);
            return;
        }
        let name: Arc<str> = Arc::from(room.as_str());
        if !self.send(Outbound::Joining(Box::new(name.clone()))) {
            return;
        }
        let member = Member {
            tx: self.tx.clone(),
            control: self.control.clone(),
        };
        if let Err(error) = self.hub.registry.join(&name, self.id, member).await {
            tracing::warn!(%error, room, "Cannot join a room.");
            self.error(
                "unavailable",
                "the hub cannot reach Redis; retry".into(),
                Some(&room),
                reference,
            );
            return;
        }
        self.rooms.insert(name.clone());
        let rooms = self.hub.registry.rooms();
        let snapshot = match &recover {
            Some(since) => {
                rooms
                    .recover(&name, since)
                    .await
                    .map(|recovery| match recovery.publications {
                        Some(publications) => (recovery.position, Some(true), publications),
                        None => (recovery.position, Some(false), Vec::new()),
                    })
            }
            None => rooms
                .position(&name)
                .await
                .map(|position| (position, None, Vec::new())),
        };
        match snapshot {
            Ok((position, recovered, publications)) => {
                self.hub.registry.observed(&name, &position);
                self.send(Outbound::Reply(Box::new(Reply::Subscribed {
                    room: name,
                    position,
                    recovered,
                    publications,
                    reference,
                })));
            }
            Err(error) => {
                tracing::warn!(%error, room, "Cannot read a room's history.");
                self.rooms.remove(&name);
                self.hub.registry.leave(&name, self.id).await;
                self.error(
                    "unavailable",
                    "the hub cannot reach Redis; retry".into(),
                    Some(&room),
                    reference,
                );
            }
        }
    }

    async fn publish(&mut self, room: String, payload: Bytes, reference: Option<u64>) {
        if !self
            .access
            .can_publish(&room, &self.hub.settings.publish_rooms)
        {
            self.error(
                "forbidden",
                "publishing to this room is not allowed".into(),
                Some(&room),
                reference,
            );
            return;
        }
        // Its own span, so the room's fan-out on every hub node continues this publication's
        // trace rather than the whole connection's.
        let span = tracing::info_span!("ws.publish", room = %room);
        match self
            .hub
            .registry
            .rooms()
            .publish(&room, &payload)
            .instrument(span)
            .await
        {
            Ok(position) => {
                metrics::counter!(HUB_PUBLICATIONS_TOTAL, "service" => NAME).increment(1);
                self.send(Outbound::Reply(Box::new(Reply::Published {
                    room,
                    position,
                    reference,
                })));
            }
            Err(error) => {
                tracing::warn!(%error, room, "Cannot publish.");
                self.error(
                    "unavailable",
                    "the hub cannot reach Redis; retry".into(),
                    Some(&room),
                    reference,
                );
            }
        }
    }
}

/// Maps a read error to a close reason. axum wraps tungstenite's error (of axum's own
/// tungstenite version, which is not ours to downcast to), so the size check goes by its
/// stable `Space limit exceeded` display text.
fn read_error_reason(error: &axum::Error) -> CloseReason {
    let text = error.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") {
        CloseReason::MessageTooBig
    } else {
        CloseReason::ProtocolError
    }
}

/// Where a client stands in one room, as seen by its writer.
enum Cursor {
    /// Joining: publications are held until the snapshot is sent.
    Pending(Vec<Arc<Delivery>>),
    /// Subscribed: the last position sent.
    Active(Position),
}

fn newer(cursor: &Position, delivery: &Delivery) -> bool {
    delivery.publication.epoch != cursor.epoch || delivery.publication.offset > cursor.offset
}

/// Most frames written before one flush.
const BATCH: usize = 64;

struct Writer {
    control: Arc<Control>,
    encoding: Encoding,
    /// Whether publications carry their `traceparent` (the client asked with `trace=1`).
    trace_context: bool,
    hold_limit: usize,
    cursors: HashMap<Arc<str>, Cursor>,
    out: Vec<Message>,
}

impl Writer {
    fn deliver(&mut self, delivery: &Arc<Delivery>) {
        match self.cursors.get_mut(&delivery.room) {
            Some(Cursor::Pending(held)) => {
                if held.len() >= self.hold_limit {
                    self.control.close(CloseReason::SlowConsumer);
                } else {
                    held.push(delivery.clone());
                }
            }
            Some(Cursor::Active(position)) if newer(position, delivery) => {
                position.epoch.clone_from(&delivery.publication.epoch);
                position.offset = delivery.publication.offset;
                self.out
                    .push(delivery.frame(self.encoding, self.trace_context));
            }
            // Already delivered (history overlap), or not (or no longer) subscribed.
            Some(Cursor::Active(_)) | None => {}
        }
    }

    fn process(&mut self, outbound: Outbound) {
        match outbound {
            Outbound::Publication(delivery) => self.deliver(&delivery),
            Outbound::Joining(room) => {
                self.cursors.insert(*room, Cursor::Pending(Vec::new()));
            }
            Outbound::Ping => self.out.push(Message::Ping(Bytes::new())),
            Outbound::Reply(reply) => {
                self.out
                    .push(reply.encode(self.encoding, self.trace_context));
                match *reply {
                    Reply::Subscribed { room, position, .. } => {
                        let held = match self.cursors.insert(room.clone(), Cursor::Active(position))
                        {
                            Some(Cursor::Pending(held)) => held,
                            _ => Vec::new(),
                        };
                        for delivery in &held {
                            self.deliver(delivery);
                        }
                    }
                    Reply::Unsubscribed { room, .. } => {
                        self.cursors.remove(&room);
                    }
                    Reply::Error {
                        room: Some(room), ..
                    } => {
                        if matches!(self.cursors.get(room.as_str()), Some(Cursor::Pending(_))) {
                            self.cursors.remove(room.as_str());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The writer task of one connection. A plain function that returns its future: an `async
/// fn` would keep its arguments twice in every idle connection.
fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    control: Arc<Control>,
    (encoding, trace_context): (Encoding, bool),
    hold_limit: usize,
    drain_jitter: Duration,
) -> impl Future<Output = ()> + Send + 'static {
    let mut writer = Writer {
        control: control.clone(),
        encoding,
        trace_context,
        hold_limit,
        cursors: HashMap::new(),
        out: Vec::new(),
    };
    async move {
        loop {
            let first = tokio::select! {
                biased;
                () = control.closed.cancelled() => break,
                first = rx.recv() => first,
            };
            let Some(first) = first else { break };
            writer.process(first);
            while writer.out.len() < BATCH {
                match rx.try_recv() {
                    Ok(next) => writer.process(next),
                    Err(_) => break,
                }
            }
            if writer.out.is_empty() {
                continue;
            }
            let frames = std::mem::take(&mut writer.out);
            let write = Box::pin(async {
                for frame in frames {
                    sink.feed(frame).await?;
                }
                sink.flush().await
            });
            let written = tokio::select! {
                biased;
                () = control.closed.cancelled() => break,
                written = write => written,
            };
            if written.is_err() {
                control.close(CloseReason::Client);
                break;
            }
        }
        let reason = control.reason();
        let farewell = async {
            if reason == CloseReason::Draining {
                let max = u64::try_from(drain_jitter.as_millis()).unwrap_or(u64::MAX);
                let delay = if max == 0 {
                    0
                } else {
                    rand::rng().random_range(0..=max)
                };
                sink.feed(reconnect_notice(delay, encoding)).await?;
            }
            sink.send(Message::Close(Some(CloseFrame {
                code: reason.code(),
                reason: reason.label().into(),
            })))
            .await
        };
        // A slow consumer may not read its close frame either; do not wait for it long.
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), farewell)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns.
    fn future_size<Args, Fut, F: FnOnce(Args) -> Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn an_idle_connection_keeps_small_tasks() {
        // Its two tasks are parked in these futures for as long as it is open. A request's
        // handling, a batch's write and the goodbye are boxed while they run; inlined, any
        // of them would take its size from every connection (`serve` was 2,128 bytes in a
        // debug build before, `write_loop` 584).
        let reader = future_size(&|(hub, socket, access, format, slot)| {
            serve(hub, socket, access, format, slot)
        });
        let writer = future_size(&|(sink, rx, control, format, hold, jitter)| {
            write_loop(sink, rx, control, format, hold, jitter)
        });
        assert!(reader <= 640, "the reader's future is {reader} bytes");
        assert!(writer <= 384, "the writer's future is {writer} bytes");
    }
}
