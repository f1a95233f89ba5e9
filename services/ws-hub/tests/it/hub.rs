//! The hub's behaviour end to end: fan-out across replicas, encodings, auth, resume,
//! protections, drain.

use std::time::Duration;

use common::rooms::HistorySettings;
use common::test_support::wait_until;
use futures::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::*;

#[tokio::test]
async fn a_client_on_replica_a_receives_publishes_made_on_replica_b_and_through_rooms_publish() {
    let prefix = prefix();
    let (a, b) = (
        start(&hub_vars(&prefix)).await,
        start(&hub_vars(&prefix)).await,
    );
    let mut reader = client(&a, &["chat:*", "doc:orders:*"]).await;
    subscribe(&mut reader, "chat:lobby").await;
    subscribe(&mut reader, "doc:orders:1").await;

    let mut writer = client(&b, &["chat:*"]).await;
    send_json(
        &mut writer,
        json!({"type": "publish", "room": "chat:lobby", "data": {"text": "hi"}, "ref": 7}),
    )
    .await;
    let published = next_json(&mut writer).await;
    assert_eq!(
        (published["type"].as_str(), published["ref"].as_u64()),
        (Some("published"), Some(7)),
        "{published}"
    );
    let pushed = next_json(&mut reader).await;
    assert_eq!(pushed["type"], "publication", "{pushed}");
    assert_eq!(pushed["room"], "chat:lobby");
    assert_eq!(pushed["data"], json!({"text": "hi"}));
    assert_eq!(pushed["offset"], published["offset"]);
    assert_eq!(pushed["epoch"], published["epoch"]);

    // How the cache updater notifies: straight through common::rooms.
    let rooms = rooms(&prefix, HistorySettings::default()).await;
    let envelope = br#"{"type":"created","collection":"orders","id":"1","version":1}"#;
    let position = rooms.publish("doc:orders:1", envelope).await.unwrap();
    let pushed = next_json(&mut reader).await;
    assert_eq!(pushed["room"], "doc:orders:1", "{pushed}");
    assert_eq!(pushed["data"]["version"], 1);
    assert_eq!(pushed["offset"], position.offset);
    assert_eq!(pushed["epoch"], position.epoch.as_str());
    a.stop().await;
    b.stop().await;
}

#[derive(Serialize)]
struct PublishBin<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    room: &'a str,
    data: &'a serde_bytes::Bytes,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Option<serde_bytes::ByteBuf>,
}

async fn next_msgpack(client: &mut ws_hub::loadgen::Client) -> Frame {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(bytes) = message {
            return rmp_serde::from_slice(&bytes).unwrap();
        }
    }
}

#[tokio::test]
async fn binary_payloads_round_trip_byte_exact_in_messagepack_and_as_base64_in_json() {
    let prefix = prefix();
    let app = start(&hub_vars(&prefix)).await;
    let msgpack = target(&app, Some(token(&["chat:*"])), true).await;
    let mut reader = msgpack.connect(None).await.unwrap();
    let mut json_reader = client(&app, &["chat:*"]).await;
    let mut writer = msgpack.connect(None).await.unwrap();
    reader
        .send(Message::binary(
            rmp_serde::to_vec_named(&json!({"type": "subscribe", "room": "chat:bin"})).unwrap(),
        ))
        .await
        .unwrap();
    assert_eq!(next_msgpack(&mut reader).await.kind, "subscribed");
    subscribe(&mut json_reader, "chat:bin").await;

    let payload: Vec<u8> = vec![0xff, 0x00, 0xfe, 0xc3, 0x28, b'\n', 0x80, 0x00];
    let frame = PublishBin {
        kind: "publish",
        room: "chat:bin",
        data: serde_bytes::Bytes::new(&payload),
    };
    writer
        .send(Message::binary(rmp_serde::to_vec_named(&frame).unwrap()))
        .await
        .unwrap();
    assert_eq!(next_msgpack(&mut writer).await.kind, "published");

    let pushed = next_msgpack(&mut reader).await;
    assert_eq!(pushed.kind, "publication");
    assert_eq!(pushed.data.unwrap().into_vec(), payload);
    let pushed = next_json(&mut json_reader).await;
    assert_eq!(pushed["dataBase64"], "/wD+wygKgAA=", "{pushed}");
    app.stop().await;
}

#[tokio::test]
async fn the_read_grant_opens_its_documents_and_collections_rooms_and_no_others() {
    let app = start(&hub_vars(&prefix())).await;
    let token = signed(json!({"sub": "reader", "read": ["books/*", "profiles/reader"]}));
    let mut client = target(&app, Some(token), false)
        .await
        .connect(None)
        .await
        .unwrap();
    let cases = [
        ("doc:books:1", true),
        ("collection:books", true),
        ("doc:profiles:reader", true),
        ("doc:profiles:other", false),
        ("collection:profiles", false),
        ("doc:users:1", false),
        ("cmd:1", false),
    ];
    for (i, (room, allowed)) in cases.into_iter().enumerate() {
        send_json(
            &mut client,
            json!({"type": "subscribe", "room": room, "ref": i}),
        )
        .await;
        let answer = next_json(&mut client).await;
        assert_eq!(answer["ref"], i, "{answer}");
        if allowed {
            assert_eq!(answer["type"], "subscribed", "{room}: {answer}");
        } else {
            assert_eq!(answer["code"], "forbidden", "{room}: {answer}");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn an_unauthorized_room_is_refused_and_bad_or_expired_tokens_are_refused_at_connect() {
    let app = start(&hub_vars(&prefix())).await;
    let mut client = client(&app, &["doc:orders:*"]).await;
    send_json(
        &mut client,
        json!({"type": "subscribe", "room": "doc:users:1", "ref": 3}),
    )
    .await;
    let refused = next_json(&mut client).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["ref"], 3);
    // Subscribing is not publishing: doc:* is not in HUB_PUBLISH_ROOMS.
    send_json(
        &mut client,
        json!({"type": "publish", "room": "doc:orders:1", "data": 1}),
    )
    .await;
    assert_eq!(next_json(&mut client).await["code"], "forbidden");

    for (what, token) in [
        ("expired", Some(token_with(&["*"], -3600, SECRET))),
        (
            "wrong signature",
            Some(token_with(
                &["*"],
                600,
                "another-secret-of-32-bytes-or-more!",
            )),
        ),
        ("malformed", Some("not-a-jwt".to_owned())),
        ("missing", None),
    ] {
        let error = target(&app, token, false)
            .await
            .connect(None)
            .await
            .unwrap_err();
        match error {
            ws_hub::loadgen::LoadError::WebSocket(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{what}");
                assert_eq!(
                    response.headers()["content-type"],
                    "application/problem+json",
                    "{what}"
                );
                // RFC 9110: a 401 carries a challenge; a refused token says why (RFC 6750).
                let challenge = response.headers()["www-authenticate"].to_str().unwrap();
                assert!(
                    challenge.starts_with("Bearer realm=\"meridian\""),
                    "{what}: {challenge}"
                );
                assert_eq!(
                    challenge.contains("error=\"invalid_token\""),
                    what != "missing",
                    "{what}: {challenge}"
                );
            }
            other => panic!("{what}: expected a 401 response, got {other}"),
        }
    }

    // The token may also come as a query parameter or a `bearer.` subprotocol.
    let url = format!("ws://{}/ws?token={}", app.addr, token(&["x"]));
    tokio_tungstenite::connect_async(url).await.unwrap();
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/ws",
        app.addr
    ))
    .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("meridian.v1.json, bearer.{}", token(&["x"]))
            .parse()
            .unwrap(),
    );
    let (_, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "meridian.v1.json"
    );
    app.stop().await;
}

#[tokio::test]
async fn resume_returns_exactly_the_missed_publications_or_recovered_false_outside_history() {
    let prefix = prefix();
    let app = start(&hub_vars(&prefix).with("HUB_HISTORY_SIZE", "5")).await;
    let rooms = rooms(
        &prefix,
        HistorySettings {
            size: 5,
            ttl: Duration::from_secs(60),
        },
    )
    .await;
    let room = "doc:orders:resume";
    let mut first = client(&app, &["doc:*"]).await;
    let subscribed = subscribe(&mut first, room).await;
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    assert_eq!(subscribed["offset"], 0);
    for n in 1..=2 {
        rooms
            .publish(room, format!("{n}").as_bytes())
            .await
            .unwrap();
        assert_eq!(next_json(&mut first).await["data"], n);
    }
    drop(first);

    for n in 3..=5 {
        rooms
            .publish(room, format!("{n}").as_bytes())
            .await
            .unwrap();
    }
    let mut second = client(&app, &["doc:*"]).await;
    send_json(
        &mut second,
        json!({"type": "subscribe", "room": room, "recover": {"epoch": epoch, "offset": 2}}),
    )
    .await;
    let resumed = next_json(&mut second).await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["offset"], 5);
    let data: Vec<_> = resumed["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["offset"].clone(), p["data"].clone()))
        .collect();
    assert_eq!(
        data,
        vec![
            (json!(3), json!(3)),
            (json!(4), json!(4)),
            (json!(5), json!(5))
        ]
    );
    // Live publications continue right after, exactly once.
    rooms.publish(room, b"6").await.unwrap();
    let live = next_json(&mut second).await;
    assert_eq!(
        (live["offset"].clone(), live["data"].clone()),
        (json!(6), json!(6))
    );
    drop(second);

    // Offsets 3..=6 are gone from a 5-entry history after five more publications.
    for n in 7..=11 {
        rooms
            .publish(room, format!("{n}").as_bytes())
            .await
            .unwrap();
    }
    for (recover, why) in [
        (
            json!({"epoch": epoch, "offset": 2}),
            "trimmed from the history",
        ),
        (
            json!({"epoch": "another-epoch", "offset": 10}),
            "another epoch",
        ),
    ] {
        let mut late = client(&app, &["doc:*"]).await;
        send_json(
            &mut late,
            json!({"type": "subscribe", "room": room, "recover": recover}),
        )
        .await;
        let answer = next_json(&mut late).await;
        assert_eq!(answer["recovered"], false, "{why}: {answer}");
        assert_eq!(answer["publications"], json!([]), "{why}");
        assert_eq!(
            (answer["epoch"].as_str(), answer["offset"].as_u64()),
            (Some(epoch.as_str()), Some(11))
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_is_cut_without_delaying_the_others() {
    let prefix = prefix();
    let app = start(
        &hub_vars(&prefix)
            .with("HUB_SEND_QUEUE", "16")
            .with("HUB_HISTORY_SIZE", "4"),
    )
    .await;
    let rooms = rooms(
        &prefix,
        HistorySettings {
            size: 4,
            ttl: Duration::from_secs(60),
        },
    )
    .await;
    let room = "chat:firehose";
    let mut slow = client(&app, &["chat:*"]).await;
    subscribe(&mut slow, room).await;
    let mut fast = client(&app, &["chat:*"]).await;
    subscribe(&mut fast, room).await;

    // 200 × 64 KiB: far more than the socket buffers and the 16-frame queue hold.
    let count = 200_u64;
    let payload = vec![b'x'; 64 * 1024];
    let payload_json = serde_json::to_vec(&String::from_utf8(payload).unwrap()).unwrap();
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < count {
            let pushed = next_json(&mut fast).await;
            last = pushed["offset"].as_u64().unwrap();
        }
        last
    });
    for _ in 0..count {
        rooms.publish(room, &payload_json).await.unwrap();
    }
    let last = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast client was delayed")
        .unwrap();
    assert_eq!(last, count);

    // The slow client (which never read) finds the hub closed it before the end.
    let mut received = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(received < count, "the slow client received everything");
    assert!(matches!(code, Some(4000) | None), "closed with {code:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_connection_limit_answers_503_problem_json_after_the_token_check() {
    let app = start(&hub_vars(&prefix()).with("HUB_MAX_CONNECTIONS", "2")).await;
    let target = target(&app, Some(token(&["*"])), false).await;
    let _one = target.connect(None).await.unwrap();
    let _two = target.connect(None).await.unwrap();
    match target.connect(None).await.unwrap_err() {
        ws_hub::loadgen::LoadError::WebSocket(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            assert_eq!(response.headers()["retry-after"], "1");
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(
                body["type"],
                "https://meridian.dev/problems/capacity-exceeded"
            );
        }
        other => panic!("expected 503, got {other}"),
    }
    // The token is checked before a slot is looked for: a bad one is told so even when full.
    let forged = token_with(&["*"], 600, "another-secret-of-32-bytes-or-more!");
    let forged = crate::support::target(&app, Some(forged), false).await;
    match forged.connect(None).await.unwrap_err() {
        ws_hub::loadgen::LoadError::WebSocket(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected 401, got {other}"),
    }
    drop(_one);
    wait_until("a slot to free up", Duration::from_secs(10), || {
        let target = target.clone();
        async move { target.connect(None).await.is_ok() }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn one_subject_and_one_address_hold_only_their_share_of_a_node() {
    let app = start(
        &hub_vars(&prefix())
            .with("HUB_MAX_CONNECTIONS_PER_SUBJECT", "2")
            .with("HUB_MAX_CONNECTIONS_PER_ADDRESS", "3"),
    )
    .await;
    let as_subject = |sub: &str| signed(json!({"sub": sub, "rooms": ["*"]}));
    let alice = target(&app, Some(as_subject("alice")), false).await;
    let refusal = |error: ws_hub::loadgen::LoadError| match error {
        ws_hub::loadgen::LoadError::WebSocket(tungstenite::Error::Http(response)) => {
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            (
                response.status().as_u16(),
                body["detail"].as_str().unwrap().to_owned(),
            )
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    };
    let first = alice.connect(None).await.unwrap();
    let _second = alice.connect(None).await.unwrap();
    let (status, detail) = refusal(alice.connect(None).await.unwrap_err());
    assert_eq!(status, 429);
    assert!(detail.contains("subject already holds 2"), "{detail}");
    // Another subject from the same address: within the address's share of 3.
    let bob = target(&app, Some(as_subject("bob")), false).await;
    let _third = bob.connect(None).await.unwrap();
    let carol = target(&app, Some(as_subject("carol")), false).await;
    let (status, detail) = refusal(carol.connect(None).await.unwrap_err());
    assert_eq!(status, 429);
    assert!(detail.contains("address already holds 3"), "{detail}");
    // A closed connection gives its share back.
    drop(first);
    wait_until("alice's share to free up", Duration::from_secs(10), || {
        let alice = alice.clone();
        async move { alice.connect(None).await.is_ok() }
    })
    .await;
    let metrics = common::test_support::metrics_text(&app.url("")).await;
    for reason in ["subject_limit", "address_limit"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "hub_connections_rejected_total{{reason={reason}}} missing"
        );
    }
    app.stop().await;
}

async fn numsub(channel: &str) -> u64 {
    let mut conn = redis().await;
    let sharded = common::test_support::Deps::from_env().redis_cluster;
    let (_, count): (String, u64) = redis::cmd("PUBSUB")
        .arg(if sharded { "SHARDNUMSUB" } else { "NUMSUB" })
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}

#[tokio::test]
async fn each_node_holds_one_redis_subscription_per_room_however_many_clients_joined() {
    let prefix = prefix();
    let (a, b) = (
        start(&hub_vars(&prefix)).await,
        start(&hub_vars(&prefix)).await,
    );
    let cluster = common::test_support::Deps::from_env().redis_cluster;
    let channel = common::redis::tagged(&prefix, "room:", "chat:shared", cluster);
    let mut clients = Vec::new();
    for app in [&a, &a, &a, &a, &b, &b] {
        let mut c = client(app, &["chat:*"]).await;
        subscribe(&mut c, "chat:shared").await;
        clients.push(c);
    }
    assert_eq!(numsub(&channel).await, 2, "one subscription per node");

    // Three of A's four clients leave: A keeps its one subscription.
    for mut c in clients.drain(..3) {
        send_json(
            &mut c,
            json!({"type": "unsubscribe", "room": "chat:shared"}),
        )
        .await;
        assert_eq!(next_json(&mut c).await["type"], "unsubscribed");
    }
    assert_eq!(numsub(&channel).await, 2);
    // The last clients go away (one disconnects, the others unsubscribe).
    drop(clients.remove(0));
    for mut c in clients {
        send_json(
            &mut c,
            json!({"type": "unsubscribe", "room": "chat:shared"}),
        )
        .await;
        assert_eq!(next_json(&mut c).await["type"], "unsubscribed");
    }
    let channel_ = channel.clone();
    wait_until("both nodes to unsubscribe", Duration::from_secs(10), || {
        let channel = channel_.clone();
        async move { numsub(&channel).await == 0 }
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_oversize_frame_closes_the_connection_with_1009() {
    let app = start(&hub_vars(&prefix()).with("HUB_MAX_MESSAGE_BYTES", "2048")).await;
    let mut small = client(&app, &["chat:*"]).await;
    send_json(
        &mut small,
        json!({"type": "publish", "room": "chat:big", "data": "x".repeat(1000)}),
    )
    .await;
    assert_eq!(next_json(&mut small).await["type"], "published");
    send_json(
        &mut small,
        json!({"type": "publish", "room": "chat:big", "data": "x".repeat(4096)}),
    )
    .await;
    assert_eq!(close_code(&mut small).await, Some(1009));
    app.stop().await;
}

#[tokio::test]
async fn messages_far_larger_than_the_read_buffer_arrive_whole() {
    // The hub reads a client's socket 512 bytes at a time; a message close to
    // `HUB_MAX_MESSAGE_BYTES` (64 KiB) is read in steps and handled whole, and the next small
    // one after it still is.
    let app = start(&hub_vars(&prefix())).await;
    let mut reader = client(&app, &["chat:*"]).await;
    subscribe(&mut reader, "chat:large").await;
    let mut writer = client(&app, &["chat:*"]).await;
    let text: String = (0..60_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for data in [text.as_str(), "small"] {
        send_json(
            &mut writer,
            json!({"type": "publish", "room": "chat:large", "data": data}),
        )
        .await;
        assert_eq!(next_json(&mut writer).await["type"], "published");
        let pushed = next_json(&mut reader).await;
        assert_eq!(pushed["type"], "publication");
        assert_eq!(pushed["data"].as_str(), Some(data));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_client_over_its_message_rate_gets_errors_then_is_closed() {
    let app = start(
        &hub_vars(&prefix())
            .with("HUB_MESSAGE_RATE", "1")
            .with("HUB_MESSAGE_BURST", "2"),
    )
    .await;
    let mut client = client(&app, &["chat:*"]).await;
    for n in 0..3 {
        send_json(
            &mut client,
            json!({"type": "unsubscribe", "room": "chat:x", "ref": n}),
        )
        .await;
    }
    assert_eq!(next_json(&mut client).await["code"], "not-subscribed");
    assert_eq!(next_json(&mut client).await["code"], "not-subscribed");
    let limited = next_json(&mut client).await;
    assert_eq!(
        (limited["code"].as_str(), limited["ref"].as_u64()),
        (Some("rate-limited"), Some(2))
    );
    for n in 3..10 {
        send_json(
            &mut client,
            json!({"type": "unsubscribe", "room": "chat:x", "ref": n}),
        )
        .await;
    }
    assert_eq!(close_code(&mut client).await, Some(1008));
    app.stop().await;
}

#[tokio::test]
async fn shutdown_tells_clients_to_reconnect_and_closes_with_1012() {
    let app = start(&hub_vars(&prefix()).with("HUB_DRAIN_JITTER_MS", "100")).await;
    let mut client = client(&app, &["chat:*"]).await;
    subscribe(&mut client, "chat:drain").await;
    let addr = app.addr;
    let stopping = tokio::spawn(app.stop());
    let notice = next_json(&mut client).await;
    assert_eq!(notice["type"], "reconnect", "{notice}");
    assert!(notice["delayMs"].as_u64().unwrap() <= 100);
    assert_eq!(close_code(&mut client).await, Some(1012));
    stopping.await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn publications_made_while_the_pubsub_connection_was_down_are_delivered_after_it_returns() {
    let prefix = prefix();
    let (mut toggle, app) = start_behind_toggle(&prefix).await;
    let rooms = rooms(&prefix, HistorySettings::default()).await;
    let mut client = client(&app, &["chat:*"]).await;
    subscribe(&mut client, "chat:outage").await;
    rooms.publish("chat:outage", b"1").await.unwrap();
    assert_eq!(next_json(&mut client).await["data"], 1);

    toggle.down().await;
    rooms.publish("chat:outage", b"2").await.unwrap();
    rooms.publish("chat:outage", b"3").await.unwrap();
    toggle.up().await;

    for n in 2..=3 {
        let pushed = next_json(&mut client).await;
        assert_eq!(
            (pushed["offset"].as_u64(), pushed["data"].as_u64()),
            (Some(n), Some(n))
        );
    }
    rooms.publish("chat:outage", b"4").await.unwrap();
    assert_eq!(
        next_json(&mut client).await["data"],
        4,
        "live again, no duplicates"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_pubsub_connection_whose_peer_vanished_is_dropped_and_replaced() {
    let prefix = prefix();
    let (mut toggle, app) = start_behind_toggle(&prefix).await;
    let rooms = rooms(&prefix, HistorySettings::default()).await;
    let mut client = client(&app, &["chat:*"]).await;
    subscribe(&mut client, "chat:vanished").await;
    rooms.publish("chat:vanished", b"1").await.unwrap();
    assert_eq!(next_json(&mut client).await["data"], 1);

    // Nothing closes: only the hub's ping can tell, and /ready then names the connection.
    toggle.freeze();
    rooms.publish("chat:vanished", b"2").await.unwrap();
    let ready = app.url("/ready");
    wait_until(
        "/ready to report the pub/sub connection down",
        Duration::from_secs(30),
        || {
            let ready = ready.clone();
            async move {
                matches!(
                    common::test_support::get_json(&ready).await,
                    Some((503, body)) if body["dependencies"]["redis-pubsub"]["status"] == "down"
                )
            }
        },
    )
    .await;

    // The peer is back: the hub reconnects (a frozen attempt times out), catches up, goes on.
    toggle.down().await;
    toggle.up().await;
    let pushed = next_json(&mut client).await;
    assert_eq!(
        (pushed["offset"].as_u64(), pushed["data"].as_u64()),
        (Some(2), Some(2))
    );
    rooms.publish("chat:vanished", b"3").await.unwrap();
    assert_eq!(next_json(&mut client).await["data"], 3);
    wait_until("/ready to be 200 again", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { matches!(common::test_support::get_json(&ready).await, Some((200, _))) }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_asks_for_trace_context_gets_each_publications_traceparent() {
    let prefix = prefix();
    let app = start(&hub_vars(&prefix)).await;
    let room = "doc:orders:9";
    let mut traced = target(&app, Some(token(&["doc:orders:*"])), false).await;
    traced.url.set_query(Some("trace=1"));
    let mut traced = traced.connect(None).await.unwrap();
    let mut plain = client(&app, &["doc:orders:*"]).await;
    subscribe(&mut traced, room).await;
    subscribe(&mut plain, room).await;

    // A frame as the publish script builds it for a publisher with a trace.
    let rooms = rooms(&prefix, HistorySettings::default()).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let frame = common::rooms::Publication {
        epoch: "e1".into(),
        offset: 1,
        trace_parent: Some(traceparent.into()),
        published_at_micros: common::rooms::now_micros(),
        payload: axum::body::Bytes::from_static(br#"{"version":1}"#),
    }
    .encode();
    let publish = if rooms.sharded() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    let () = redis::cmd(publish)
        .arg(rooms.channel(room))
        .arg(frame)
        .query_async(&mut redis().await)
        .await
        .unwrap();

    let pushed = next_json(&mut traced).await;
    assert_eq!(pushed["type"], "publication", "{pushed}");
    assert_eq!(pushed["traceparent"], traceparent);
    let pushed = next_json(&mut plain).await;
    assert_eq!(pushed["type"], "publication", "{pushed}");
    assert!(pushed.get("traceparent").is_none(), "{pushed}");
    assert_eq!(pushed["data"]["version"], 1);
    app.stop().await;
}
