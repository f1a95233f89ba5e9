use super::*;

fn publication(payload: &'static [u8]) -> Publication {
    Publication {
        epoch: "e1".into(),
        offset: 7,
        trace_parent: None,
        published_at_micros: 1,
        payload: Bytes::from_static(payload),
    }
}

fn text(message: Message) -> serde_json::Value {
    match message {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[test]
fn a_json_subscribe_with_recovery_decodes() {
    let request = Request::from_json(
        r#"{"type":"subscribe","room":"doc:orders:1","recover":{"epoch":"e","offset":3},"ref":9}"#,
    )
    .unwrap();
    assert_eq!(
        request,
        Request::Subscribe {
            room: "doc:orders:1".into(),
            recover: Some(Recover {
                epoch: "e".into(),
                offset: 3
            }),
            reference: Some(9),
        }
    );
}

#[test]
fn a_json_publish_carries_its_data_as_json_bytes() {
    let request =
        Request::from_json(r#"{"type":"publish","room":"r","data":{"a":[1,2]}}"#).unwrap();
    let Request::Publish { payload, .. } = request else {
        panic!("not a publish: {request:?}");
    };
    assert_eq!(&payload[..], br#"{"a":[1,2]}"#);
}

#[test]
fn an_unknown_type_or_missing_room_is_refused_with_a_reason() {
    for bad in [
        r#"{"type":"dance","room":"r"}"#,
        r#"{"type":"subscribe"}"#,
        "nope",
    ] {
        let error = Request::from_json(bad).unwrap_err();
        assert!(error.starts_with("invalid JSON message"), "{error}");
    }
}

#[test]
fn a_msgpack_publish_keeps_binary_data_byte_exact() {
    #[derive(Serialize)]
    struct Publish<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        room: &'a str,
        data: &'a serde_bytes::Bytes,
    }
    let data = [0xff_u8, 0x00, 0xc3, 0x28, 0x80];
    let frame = rmp_serde::to_vec_named(&Publish {
        kind: "publish",
        room: "r",
        data: serde_bytes::Bytes::new(&data),
    })
    .unwrap();
    let Request::Publish { payload, .. } = Request::from_msgpack(&frame).unwrap() else {
        panic!("not a publish");
    };
    assert_eq!(&payload[..], &data);
}

#[test]
fn a_json_payload_is_pushed_as_data_and_other_bytes_as_base64() {
    let json = Delivery::new("r".into(), publication(br#"{"n":1}"#));
    assert_eq!(
        text(json.frame(Encoding::Json, false)),
        serde_json::json!({"type":"publication","room":"r","epoch":"e1","offset":7,"data":{"n":1}})
    );
    let binary = Delivery::new("r".into(), publication(&[0xff, 0x00]));
    assert_eq!(
        text(binary.frame(Encoding::Json, false)),
        serde_json::json!({"type":"publication","room":"r","epoch":"e1","offset":7,"dataBase64":"/wA="})
    );
}

#[test]
fn a_msgpack_push_carries_the_payload_as_bin() {
    #[derive(Deserialize)]
    struct Push {
        #[serde(rename = "type")]
        kind: String,
        offset: u64,
        data: serde_bytes::ByteBuf,
    }
    let delivery = Delivery::new("r".into(), publication(&[0xff, 0x00, 0x80]));
    let Message::Binary(frame) = delivery.frame(Encoding::MessagePack, false) else {
        panic!("expected a binary frame");
    };
    let push: Push = rmp_serde::from_slice(&frame).unwrap();
    assert_eq!(
        (push.kind.as_str(), push.offset, push.data.as_slice()),
        ("publication", 7, &[0xff, 0x00, 0x80][..])
    );
}

#[test]
fn subscribed_lists_the_recovered_publications_and_echoes_the_ref() {
    let reply = Reply::Subscribed {
        room: "r".into(),
        position: Position {
            epoch: "e1".into(),
            offset: 7,
        },
        recovered: Some(true),
        publications: vec![publication(b"1")],
        reference: Some(4),
    };
    assert_eq!(
        text(reply.encode(Encoding::Json, false)),
        serde_json::json!({
            "type": "subscribed", "room": "r", "epoch": "e1", "offset": 7, "recovered": true,
            "publications": [{"room": "r", "epoch": "e1", "offset": 7, "data": 1}], "ref": 4,
        })
    );
}

#[test]
fn the_drain_notice_says_when_to_reconnect() {
    assert_eq!(
        text(reconnect_notice(250, Encoding::Json)),
        serde_json::json!({"type": "reconnect", "reason": "draining", "delayMs": 250})
    );
}

#[test]
fn a_publication_carries_its_traceparent_only_where_the_client_asked_for_it() {
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let delivery = Delivery::new(
        "doc:c:1".into(),
        Publication {
            trace_parent: Some(traceparent.into()),
            ..publication(br#"{"v":1}"#)
        },
    );
    let plain = text(delivery.frame(Encoding::Json, false));
    assert!(plain.get("traceparent").is_none(), "{plain}");
    let traced = text(delivery.frame(Encoding::Json, true));
    assert_eq!(traced["traceparent"], traceparent);
    assert_eq!(traced["data"], plain["data"]);
    // Each variant is encoded once and kept.
    assert_eq!(text(delivery.frame(Encoding::Json, false)), plain);

    // Without a trace there is nothing to add.
    let untraced = Delivery::new("doc:c:1".into(), publication(br#"{"v":1}"#));
    assert!(
        text(untraced.frame(Encoding::Json, true))
            .get("traceparent")
            .is_none()
    );
}
