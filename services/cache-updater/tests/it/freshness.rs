//! Freshness after a crash: the cache updater is SIGKILLed (no goodbye to its consumer group)
//! while events keep coming, and started again at once, as a kubelet would. Its partitions
//! are served again once the group gives up on the dead member (`KAFKA_SESSION_TIMEOUT_MS`,
//! 10 s by default) and rebalances: the read model must stand still for 15 s at most.

use std::time::{Duration, Instant};

use common::readmodel::Lookup;
use common::test_support::{ChildProcess, wait_ready};
use serde_json::json;

use crate::support::{Stack, event, spawn_binary};

const DOCUMENTS: usize = 6;
/// What the README promises for a crashed cache updater.
const MAX_STALL: Duration = Duration::from_secs(15);

fn spawn(stack: &Stack, name: &str) -> (ChildProcess, String) {
    let (process, base, _log) = spawn_binary(stack, name, "warn");
    (process, format!("{base}/ready"))
}

/// The lowest version the read model holds over the test's documents (0 for a missing one).
async fn lowest_version(stack: &Stack) -> i64 {
    let mut lowest = i64::MAX;
    for d in 0..DOCUMENTS {
        let version = match stack.lookup("fresh", &format!("d{d}")).await {
            Lookup::Found { version, .. } | Lookup::Deleted { version } => version,
            Lookup::Missing => 0,
        };
        lowest = lowest.min(version);
    }
    lowest
}

/// Produces version `version` of every document.
async fn produce(stack: &Stack, version: i64) {
    for d in 0..DOCUMENTS {
        let id = format!("d{d}");
        let data = json!({ "version": version });
        stack
            .produce(&event("patched", "fresh", &id, version, Some(data)))
            .await;
    }
}

#[tokio::test]
async fn a_killed_cache_updater_serves_its_partitions_again_within_15_s() {
    let stack = Stack::new().await;
    let (first, ready) = spawn(&stack, "first");
    wait_ready(&ready, Duration::from_secs(60)).await;

    // Steady state: every document follows the stream.
    let mut version = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        version += 1;
        produce(&stack, version).await;
        if lowest_version(&stack).await >= version - 1 && version > 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the read model never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The crash, and the restart right away; events keep coming every 100 ms.
    drop(first);
    let killed_at = Instant::now();
    let before = version;
    let (second, ready) = spawn(&stack, "second");
    let stall = loop {
        version += 1;
        produce(&stack, version).await;
        if lowest_version(&stack).await > before {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(90),
            "the read model stood still for 90 s after the crash"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "read model stalled {:.1} s after the cache updater's SIGKILL",
        stall.as_secs_f64()
    );
    assert!(
        stall <= MAX_STALL,
        "the read model stood still for {stall:?} after the crash (at most {MAX_STALL:?})"
    );

    // Nothing was lost: the new process catches up to the last version.
    wait_ready(&ready, Duration::from_secs(30)).await;
    let last = version;
    let caught_up = Instant::now() + Duration::from_secs(30);
    while lowest_version(&stack).await < last {
        assert!(
            Instant::now() < caught_up,
            "the read model never reached {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.terminate(Duration::from_secs(30)).await;
    stack.cleanup().await;
}
