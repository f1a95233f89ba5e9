//! `common::rooms` against the real Redis: the publish script and the resume read.

use std::time::Duration;

use common::rooms::{HistorySettings, Position};
use common::test_support::wait_until;

use crate::support::{prefix, rooms};

#[tokio::test]
async fn concurrent_publishes_get_contiguous_offsets_and_history_returns_them_in_order() {
    let rooms = rooms(
        &prefix(),
        HistorySettings {
            size: 50,
            ttl: Duration::from_secs(60),
        },
    )
    .await;
    let positions = futures::future::try_join_all((0..20).map(|n| {
        let rooms = rooms.clone();
        async move { rooms.publish("r", format!("{n}").as_bytes()).await }
    }))
    .await
    .unwrap();
    let mut offsets: Vec<u64> = positions.iter().map(|p| p.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=20).collect::<Vec<_>>());
    let epoch = positions[0].epoch.clone();
    assert!(positions.iter().all(|p| p.epoch == epoch));

    let recovery = rooms
        .recover(
            "r",
            &Position {
                epoch: epoch.clone(),
                offset: 17,
            },
        )
        .await
        .unwrap();
    assert_eq!(recovery.position, Position { epoch, offset: 20 });
    let got: Vec<u64> = recovery
        .publications
        .unwrap()
        .iter()
        .map(|p| p.offset)
        .collect();
    assert_eq!(got, vec![18, 19, 20]);
}

#[tokio::test]
async fn a_room_gets_a_new_epoch_once_its_history_expired() {
    let rooms = rooms(
        &prefix(),
        HistorySettings {
            size: 10,
            ttl: Duration::from_millis(300),
        },
    )
    .await;
    let first = rooms.publish("r", b"1").await.unwrap();
    assert_eq!(first.offset, 1);
    wait_until("the room's keys to expire", Duration::from_secs(10), || {
        let rooms = rooms.clone();
        let epoch = first.epoch.clone();
        async move { rooms.position("r").await.unwrap().epoch != epoch }
    })
    .await;
    let second = rooms.publish("r", b"2").await.unwrap();
    assert_ne!(second.epoch, first.epoch);
    assert_eq!(second.offset, 1, "offsets restart with the epoch");
    let recovery = rooms.recover("r", &first).await.unwrap();
    assert_eq!(
        recovery.publications, None,
        "the old epoch cannot be resumed"
    );
}
