//! Hubs on ephemeral ports sharing a unique Redis prefix, tokens, and client helpers.

use std::time::Duration;

use common::config::{RedisConfig, Vars};
use common::redis::Redis;
use common::rooms::{HistorySettings, Rooms};
use common::shutdown::CancellationToken;
use common::test_support::{Deps, TcpToggle, TestApp, test_vars, wait_until, with_port};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use ws_hub::loadgen::{Client, Target};

pub const SECRET: &str = "ws-hub-test-secret-at-least-32-bytes!";

/// A unique key prefix, so tests share Redis without seeing each other.
pub fn prefix() -> String {
    format!("test-hub-{}:", uuid::Uuid::new_v4().simple())
}

/// Variables of a hub on `prefix` that verifies tokens signed with [`SECRET`].
pub fn hub_vars(prefix: &str) -> Vars {
    test_vars()
        .with("REDIS_KEY_PREFIX", prefix)
        // As a stack's ACL user would (the operator's rules).
        .with("REDIS_URL", common::test_support::stack_redis_url(prefix))
        .with("JWT_SECRET", SECRET)
        .with("HUB_PUBLISH_ROOMS", "chat:*")
        .with("SHUTDOWN_GRACE_SECONDS", "5")
}

pub async fn start(vars: &Vars) -> TestApp {
    let app = TestApp::start::<ws_hub::WsHub>(vars).await;
    let ready = app.url("/ready");
    wait_until("the hub to be ready", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { matches!(common::test_support::get_json(&ready).await, Some((200, _))) }
    })
    .await;
    app
}

/// A hub on `prefix` that reaches Redis through a [`TcpToggle`] (up), to play outages.
pub async fn start_behind_toggle(prefix: &str) -> (TcpToggle, TestApp) {
    let deps = Deps::from_env();
    let mut toggle = TcpToggle::new(Deps::socket_of(&deps.redis_url));
    toggle.up().await;
    let vars = hub_vars(prefix).with("REDIS_URL", with_port(&deps.redis_url, toggle.port()));
    (toggle, start(&vars).await)
}

/// A token for `rooms`, expiring in `ttl_seconds` (negative: already expired).
pub fn token_with(rooms: &[&str], ttl_seconds: i64, secret: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + ttl_seconds;
    signed_with(
        &serde_json::json!({"sub": "tester", "rooms": rooms, "exp": exp}),
        secret,
    )
}

/// An HS256 token over `claims` (an `exp` 600 s ahead is added when missing).
pub fn signed(claims: serde_json::Value) -> String {
    let mut claims = claims;
    if claims.get("exp").is_none() {
        claims["exp"] = (chrono::Utc::now().timestamp() + 600).into();
    }
    signed_with(&claims, SECRET)
}

fn signed_with(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn token(rooms: &[&str]) -> String {
    token_with(rooms, 600, SECRET)
}

pub async fn target(app: &TestApp, token: Option<String>, msgpack: bool) -> Target {
    Target::new(&format!("ws://{}/ws", app.addr), token, msgpack)
        .await
        .unwrap()
}

/// A JSON client with a token for `rooms`.
pub async fn client(app: &TestApp, rooms: &[&str]) -> Client {
    target(app, Some(token(rooms)), false)
        .await
        .connect(None)
        .await
        .unwrap()
}

pub async fn send_json(client: &mut Client, value: serde_json::Value) {
    client.send(Message::text(value.to_string())).await.unwrap();
}

/// The next JSON frame (skipping pings), within 10 s.
pub async fn next_json(client: &mut Client) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .expect("no frame within 10 s")
            .expect("the connection ended")
            .unwrap();
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Subscribes and returns the `subscribed` answer.
pub async fn subscribe(client: &mut Client, room: &str) -> serde_json::Value {
    send_json(
        client,
        serde_json::json!({"type": "subscribe", "room": room}),
    )
    .await;
    let answer = next_json(client).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    answer
}

/// The close code the hub ends the connection with (None: ended without a close frame).
pub async fn close_code(client: &mut Client) -> Option<u16> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .expect("the connection stayed open for 10 s");
        match next {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// The room API on `prefix`, connected.
pub async fn rooms(prefix: &str, history: HistorySettings) -> Rooms {
    let config: RedisConfig = test_vars()
        .with("REDIS_KEY_PREFIX", prefix)
        .parse()
        .unwrap();
    let redis =
        Redis::connect_in_background("ws-hub-test", &config, &CancellationToken::new()).unwrap();
    wait_until("Redis to connect", Duration::from_secs(10), || {
        let redis = redis.clone();
        async move { redis.connection().is_ok() }
    })
    .await;
    Rooms::new(redis, history)
}

/// A plain Redis connection for assertions.
pub async fn redis() -> common::redis::RedisConnection {
    common::test_support::redis_connection().await
}
