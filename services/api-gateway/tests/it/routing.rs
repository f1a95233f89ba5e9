//! Routing, forwarding fields, the read model with its write-model fallback, body limits and
//! WebSocket tunnelling.

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn commands_are_forwarded_with_forwarding_fields_request_id_and_trace_context() {
    let upstream = echo_upstream().await;
    let app = start_gateway(&gateway_vars(&upstream.url(), &prefix("forward"))).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http()
        .post(app.url("/v1/commands/abc?x=1&y=two"))
        .header("authorization", bearer("alice"))
        .header("x-client-id", "mallory")
        .header("x-request-id", "req-123")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "do not forward")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-end-to-end", "kept")
        .body("{\"hello\":true}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let seen: Value = response.json().await.unwrap();
    let header = |name: &str| seen["headers"][name][0].as_str().map(str::to_owned);

    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/v1/commands/abc");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body"], 14);
    // The authenticated subject replaces any client-supplied X-Client-Id.
    assert_eq!(seen["headers"]["x-client-id"], json!(["alice"]));
    assert_eq!(header("x-request-id").as_deref(), Some("req-123"));
    assert_eq!(header("x-end-to-end").as_deref(), Some("kept"));
    // Hop-by-hop fields, including the one named in `Connection`, stop at the gateway.
    for hop in [
        "x-hop-secret",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(seen["headers"].get(hop).is_none(), "{hop} leaked: {seen}");
    }
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    let forwarded = header("forwarded").unwrap();
    assert!(
        forwarded.starts_with("for=127.0.0.1;proto=http;host="),
        "{forwarded}"
    );
    // The trace continues: same trace id (the parent span is the gateway's when it records).
    let traceparent = header("traceparent").unwrap();
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent}"
    );
    // A request without an id gets a generated one, forwarded and echoed.
    let response = http()
        .get(app.url("/v1/commands/xyz"))
        .header("authorization", bearer("alice"))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let seen: Value = response.json().await.unwrap();
    assert!(!id.is_empty());
    assert_eq!(seen["headers"]["x-request-id"], json!([id]));
    app.stop().await;
}

#[tokio::test]
async fn documents_come_from_redis_fall_back_to_the_write_model_and_honour_tombstones() {
    let upstream = echo_upstream().await;
    let prefix = prefix("documents");
    let app = start_gateway(&gateway_vars(&upstream.url(), &prefix)).await;
    let mut redis = redis().await;
    let key = |id: &str| common::readmodel::document_key(&prefix, "orders", id);
    let _: () = redis::cmd("HSET")
        .arg(key("1"))
        .arg("version")
        .arg("3")
        .arg("data")
        .arg(r#"{"total":42,"items":["a"]}"#)
        .arg("updatedAt")
        .arg("2026-01-01T00:00:00Z")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(key("2"))
        .arg("version")
        .arg("5")
        .arg("deleted")
        .arg("1")
        .query_async(&mut redis)
        .await
        .unwrap();
    let get = |path: &str| {
        http()
            .get(app.url(path))
            .header("authorization", bearer("reader"))
    };

    // Hit: the projection, with its version as the ETag.
    let response = get("/v1/documents/orders/1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"3\"");
    assert_eq!(response.headers()["x-cache"], "hit");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"collection": "orders", "id": "1", "version": 3,
               "data": {"total": 42, "items": ["a"]}, "updatedAt": "2026-01-01T00:00:00Z"})
    );
    let response = get("/v1/documents/orders/1")
        .header("if-none-match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 304);

    // Miss: the write model answers.
    let response = get("/v1/documents/orders/9").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-cache"], "miss");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["source"], "write-model");
    assert_eq!(body["id"], "9");

    // Tombstone: 404 without asking the write model (which would still have it).
    let response = get("/v1/documents/orders/2").send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-cache"], "hit");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://meridian.dev/problems/not-found");

    // A token is required here.
    let response = http()
        .get(app.url("/v1/documents/orders/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let _: () = redis::cmd("DEL")
        .arg(key("1"))
        .arg(key("2"))
        .query_async(&mut redis)
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn oversize_bodies_are_refused_with_a_413_problem_before_reaching_the_upstream() {
    let upstream = echo_upstream().await;
    let vars =
        gateway_vars(&upstream.url(), &prefix("limits")).with("GATEWAY_MAX_BODY_BYTES", "1024");
    let app = start_gateway(&vars).await;
    let post = |body: reqwest::Body| {
        http()
            .post(app.url("/v1/commands"))
            .header("authorization", bearer("alice"))
            .body(body)
            .send()
    };
    // Declared length over the limit.
    let response = post(vec![b'x'; 2048].into()).await.unwrap();
    assert_eq!(response.status(), 413);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://meridian.dev/problems/payload-too-large"
    );
    // Chunked (no length) over the limit.
    let response = post(chunked(4, 512)).await.unwrap();
    assert_eq!(response.status(), 413);
    // Chunked within the limit passes whole.
    let response = post(chunked(2, 256)).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["body"], 512);
    app.stop().await;
}

/// A body far over the limit, written whole by a client that reads the answer only after:
/// the gateway reads the rest of the refused body instead of closing on it, so the client
/// gets the 413 (a close with unread bytes would reset the connection and lose it).
#[tokio::test]
async fn a_client_still_sending_an_oversize_body_gets_the_413_not_a_reset() {
    let upstream = echo_upstream().await;
    let vars =
        gateway_vars(&upstream.url(), &prefix("linger")).with("GATEWAY_MAX_BODY_BYTES", "1024");
    let app = start_gateway(&vars).await;
    for attempt in 0..10 {
        let (response, sent) = common::test_support::post_oversize(
            app.addr,
            "/v1/commands",
            &[format!("Authorization: {}", bearer("alice"))],
            4 * 1024 * 1024,
        )
        .await;
        assert!(
            response.starts_with("HTTP/1.1 413"),
            "attempt {attempt}: {response}"
        );
        assert!(sent, "attempt {attempt}: the body was not read");
    }
    app.stop().await;
}

/// A body of `count` chunks of `size` bytes, sent without a length (chunked).
fn chunked(count: usize, size: usize) -> reqwest::Body {
    let frames = (0..count)
        .map(|_| {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
                b'y';
                size
            ])))
        })
        .collect::<Vec<_>>();
    reqwest::Body::wrap(http_body_util::StreamBody::new(futures::stream::iter(
        frames,
    )))
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_problem() {
    let dead = format!("http://127.0.0.1:{}", common::test_support::free_port());
    let app = start_gateway(&gateway_vars(&dead, &prefix("dead"))).await;
    let response = http()
        .get(app.url("/v1/commands/x"))
        .header("authorization", bearer("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://meridian.dev/problems/dependency-unavailable"
    );
    app.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_are_tunnelled_to_the_hub_byte_exact() {
    let upstream = echo_upstream().await;
    let app = start_gateway(&gateway_vars(&upstream.url(), &prefix("ws"))).await;
    let url = format!("ws://{}/ws", app.addr);
    let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    socket
        .send(Message::Text("hello through the gateway".into()))
        .await
        .unwrap();
    let binary: Vec<u8> = (0..=255).collect();
    socket
        .send(Message::Binary(binary.clone().into()))
        .await
        .unwrap();
    let text = socket.next().await.unwrap().unwrap();
    assert_eq!(text, Message::Text("hello through the gateway".into()));
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), binary.as_slice());
    socket.close(None).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_route_table_from_the_environment_replaces_the_default() {
    let upstream = echo_upstream().await;
    let routes = json!([
        {"name": "public", "path": "/v1/public", "upstream": upstream.url(), "auth": "optional"},
        {"name": "private", "path": "/v1/private", "upstream": "command-service"}
    ]);
    let vars =
        gateway_vars(&upstream.url(), &prefix("table")).with("GATEWAY_ROUTES", routes.to_string());
    let app = start_gateway(&vars).await;
    let status = |path: &str, auth: Option<String>| {
        let mut request = http().get(app.url(path));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/v1/public/page", None).await, 200);
    assert_eq!(status("/v1/public", Some(bearer("bob"))).await, 200);
    // Optional still refuses a bad token.
    assert_eq!(
        status("/v1/public", Some("Bearer not.a.token".into())).await,
        401
    );
    assert_eq!(status("/v1/private/x", None).await, 401);
    assert_eq!(status("/v1/private/x", Some(bearer("bob"))).await, 200);
    // The default table is gone.
    assert_eq!(status("/v1/commands", Some(bearer("bob"))).await, 404);
    app.stop().await;
}

/// The real command service binary, verifying the same tokens as the test gateways.
async fn spawn_command_service(name: &str) -> (common::test_support::ChildProcess, String) {
    let port = common::test_support::free_port();
    let log = std::env::temp_dir().join(format!("meridian-gateway-it-{name}-{port}.log"));
    let service = common::test_support::ChildProcess::spawn(
        &common::test_support::workspace_binary("command-service"),
        &[
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".into()),
            ("RUST_LOG", "warn".into()),
            (
                "KAFKA_TOPIC_PREFIX",
                format!("gw-it-{}.", uuid::Uuid::now_v7().simple()),
            ),
            ("JWT_SECRET", SECRET.into()),
            ("JWT_AUDIENCE", AUDIENCE.into()),
            ("JWT_ISSUER", ISSUER.into()),
        ],
        &log,
    );
    let command_service = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{command_service}/ready")).await;
    (service, command_service)
}

#[tokio::test]
async fn the_real_command_service_scopes_idempotency_by_the_token_subject() {
    let (service, command_service) = spawn_command_service("commands").await;
    let app = start_gateway(&gateway_vars(&command_service, &prefix("real"))).await;

    let key = format!("key-{}", uuid::Uuid::now_v7());
    let command =
        json!({"type": "create", "collection": "gw-books", "id": key, "payload": {"t": 1}});
    let submit = |sub: &str, spoofed_client: &str| {
        http()
            .post(app.url("/v1/commands"))
            .header("authorization", bearer(sub))
            .header("x-client-id", spoofed_client)
            .header("idempotency-key", &key)
            .json(&command)
            .send()
    };
    let first = submit("grace", "spoofed-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    // Same subject, another client-supplied id: the same scope, so a replay.
    let replay = submit("grace", "spoofed-2").await.unwrap();
    assert_eq!(replay.status(), 202);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["commandId"], first["commandId"]);
    // Another subject with the same key: its own scope, its own command.
    let other = submit("heidi", "spoofed-1").await.unwrap();
    assert_eq!(other.status(), 202);
    let other: Value = other.json().await.unwrap();
    assert_ne!(other["commandId"], first["commandId"]);

    // The status route is scoped by the same subject.
    let status_url = app.url(&format!(
        "/v1/commands/{}",
        first["commandId"].as_str().unwrap()
    ));
    let own = http()
        .get(&status_url)
        .header("authorization", bearer("grace"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let foreign = http()
        .get(&status_url)
        .header("authorization", bearer("heidi"))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);

    app.stop().await;
    service.terminate(std::time::Duration::from_secs(30)).await;
}

#[tokio::test]
async fn reads_and_commands_are_allowed_only_within_the_tokens_grants() {
    let (service, command_service) = spawn_command_service("grants").await;
    let app = start_gateway(&gateway_vars(&command_service, &prefix("grants"))).await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let collection = format!("gw-orders-{run}");
    let ivan = format!(
        "Bearer {}",
        token(&granted(
            "ivan",
            &[&format!("{collection}/*")],
            &[&format!("{collection}/ivan-*")]
        ))
    );
    let submit = |base: &str, authorization: Option<&str>, collection: &str, id: &str| {
        let mut request = http()
            .post(format!("{base}/v1/commands"))
            .header("idempotency-key", format!("{collection}-{id}"))
            .header("x-client-id", "ivan")
            .json(&json!({"type": "create", "collection": collection, "id": id, "payload": {}}));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        request.send()
    };
    let gateway = app.url("");
    let gateway = gateway.trim_end_matches('/');

    // Commands: only documents the `write` claim covers.
    let own = submit(gateway, Some(&ivan), &collection, "ivan-1")
        .await
        .unwrap();
    assert_eq!(own.status(), 202);
    for (collection, id) in [(collection.as_str(), "olga-1"), ("gw-users", "ivan-1")] {
        let refused = submit(gateway, Some(&ivan), collection, id).await.unwrap();
        assert_eq!(refused.status(), 403, "{collection}/{id}");
        let problem: Value = refused.json().await.unwrap();
        assert_eq!(problem["type"], "https://meridian.dev/problems/forbidden");
        assert_eq!(
            problem["detail"],
            format!("the token's `write` claim does not cover {collection}/{id}")
        );
    }

    // Reads: the gateway refuses before any lookup; the write model answers within the grant.
    let read = |path: String| {
        http()
            .get(app.url(&path))
            .header("authorization", &ivan)
            .send()
    };
    let foreign = read("/v1/documents/gw-users/1".into()).await.unwrap();
    assert_eq!(foreign.status(), 403);
    let problem: Value = foreign.json().await.unwrap();
    assert_eq!(
        problem["detail"],
        "the token's `read` claim does not cover gw-users/1"
    );
    let absent = read(format!("/v1/documents/{collection}/never-written"))
        .await
        .unwrap();
    assert_eq!(absent.status(), 404, "within the grant: found or not found");

    // Another pod reaching the command service directly cannot act without a token, whatever
    // X-Client-Id it sends, nor beyond its token's grants.
    let direct = submit(&command_service, None, &collection, "ivan-2")
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);
    assert_eq!(
        direct.headers()["www-authenticate"],
        "Bearer realm=\"meridian\""
    );
    let direct = submit(&command_service, Some(&ivan), &collection, "olga-2")
        .await
        .unwrap();
    assert_eq!(direct.status(), 403);
    let direct = http()
        .get(format!("{command_service}/v1/documents/gw-users/1"))
        .header("authorization", &ivan)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 403);

    // Both refusals are counted where they happened.
    for (base, action) in [(gateway, "read"), (command_service.as_str(), "write")] {
        let metrics = common::test_support::metrics_text(base).await;
        assert!(
            metrics.lines().any(|l| l.starts_with("access_denied_total")
                && l.contains(&format!("action=\"{action}\""))),
            "{base}: access_denied_total{{action={action}}} missing"
        );
    }
    app.stop().await;
    service.terminate(std::time::Duration::from_secs(30)).await;
}
