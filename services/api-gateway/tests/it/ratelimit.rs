//! Distributed rate limiting: exact across two gateway processes sharing Redis, IETF
//! headers, and the fail-open / fail-closed behaviour when Redis is down.

use std::time::Duration;

use common::test_support::{Deps, TcpToggle, with_port};
use serde_json::{Value, json};

use crate::support::*;

/// Parses `RateLimit`/`RateLimit-Policy` with the structured-field parser and returns each
/// member as (name, parameters).
fn members(value: &str) -> Vec<(String, Vec<(String, i64)>)> {
    let list: sfv::List = sfv::Parser::new(value).parse().unwrap();
    list.iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => (
                item.bare_item.as_string().unwrap().as_str().to_owned(),
                item.params
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), i64::from(v.as_integer().unwrap())))
                    .collect(),
            ),
            sfv::ListEntry::InnerList(_) => panic!("unexpected inner list in {value}"),
        })
        .collect()
}

#[tokio::test]
async fn two_gateway_processes_share_one_exact_limit_and_report_it_in_ietf_headers() {
    const LIMIT: usize = 20;
    let upstream = echo_upstream().await;
    let prefix = prefix("exact");
    let policies = json!([
        {"name": "per-user", "key": "user", "rate": LIMIT, "period": "Hour", "burst": LIMIT}
    ]);
    let env = [
        // As a stack's ACL user would (the operator's rules).
        ("REDIS_URL", common::test_support::stack_redis_url(&prefix)),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("GATEWAY_COMMAND_SERVICE_URL", upstream.url()),
        ("JWT_SECRET", SECRET.to_owned()),
        ("JWT_AUDIENCE", AUDIENCE.to_owned()),
        ("GATEWAY_RATE_LIMITS", policies.to_string()),
        // Exactness is about Redis' answers: a loaded debug build must not fail open.
        ("GATEWAY_RATE_LIMIT_TIMEOUT_MS", "5000".to_owned()),
    ];
    let (first, a) = spawn_gateway("rl-a", &env).await;
    let (second, b) = spawn_gateway("rl-b", &env).await;
    let client = http();
    let auth = bearer("carol");

    // A first request shows the headers of a fresh bucket.
    let response = client
        .get(format!("{a}/v1/commands/1"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let policy = response.headers()["ratelimit-policy"].to_str().unwrap();
    assert_eq!(
        members(policy),
        [(
            "per-user".to_owned(),
            vec![("q".to_owned(), LIMIT as i64), ("w".to_owned(), 3600)]
        )]
    );
    let state = members(response.headers()["ratelimit"].to_str().unwrap());
    assert_eq!(state[0].0, "per-user");
    assert_eq!(state[0].1[0], ("r".to_owned(), LIMIT as i64 - 1));
    assert_eq!(state[0].1[1].0, "t");
    assert!((1..=180).contains(&state[0].1[1].1), "{state:?}");

    // Then 2 × LIMIT concurrent requests split across both processes: exactly the
    // LIMIT - 1 left are allowed.
    let requests = (0..2 * LIMIT).map(|i| {
        let url = format!("{}/v1/commands/{i}", if i % 2 == 0 { &a } else { &b });
        let request = client.get(url).header("authorization", &auth);
        async move { request.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures::future::join_all(requests).await;
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let denied = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((allowed, denied), (LIMIT - 1, LIMIT + 1), "{statuses:?}");

    // Refused on both, with Retry-After, zero remaining and a problem body.
    for base in [&a, &b] {
        let response = client
            .get(format!("{base}/v1/commands/x"))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // One token per 3600 / LIMIT = 180 s.
        assert!((1..=180).contains(&retry_after), "{retry_after}");
        let state = members(response.headers()["ratelimit"].to_str().unwrap());
        assert_eq!(state[0].1[0], ("r".to_owned(), 0));
        let problem: Value = response.json().await.unwrap();
        assert_eq!(
            problem["type"],
            "https://meridian.dev/problems/rate-limited"
        );
        assert_eq!(problem["status"], 429);
    }

    // Another user has a budget of their own.
    let response = client
        .get(format!("{b}/v1/commands/1"))
        .header("authorization", bearer("dave"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    for base in [&a, &b] {
        let metrics = common::test_support::metrics_text(base).await;
        assert!(!metrics.contains("decision=\"fail_open\""), "{metrics}");
    }
    first.terminate(Duration::from_secs(30)).await;
    second.terminate(Duration::from_secs(30)).await;
}

async fn gateway_behind_toggled_redis(
    test: &str,
    fail_mode: &str,
) -> (TcpToggle, common::test_support::TestApp, Server) {
    let deps = Deps::from_env();
    let mut toggle = TcpToggle::new(Deps::socket_of(&deps.redis_url));
    toggle.up().await;
    let upstream = echo_upstream().await;
    let policies = json!([{"name": "per-ip", "key": "ip", "rate": 1000, "period": "Second"}]);
    let vars = gateway_vars(&upstream.url(), &prefix(test))
        .with("REDIS_URL", with_port(&deps.redis_url, toggle.port()))
        .with("REDIS_TIMEOUT_MS", "200")
        .with("GATEWAY_RATE_LIMITS", policies.to_string())
        .with("GATEWAY_RATE_LIMIT_TIMEOUT_MS", "200")
        .with("GATEWAY_RATE_LIMIT_FAIL_MODE", fail_mode);
    let app = start_gateway(&vars).await;
    (toggle, app, upstream)
}

#[tokio::test]
async fn rate_limiting_fails_open_when_redis_is_down() {
    let (mut toggle, app, _upstream) = gateway_behind_toggled_redis("open", "open").await;
    let get = || {
        http()
            .get(app.url("/v1/commands/1"))
            .header("authorization", bearer("erin"))
            .send()
    };
    let response = get().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("ratelimit"));

    toggle.down().await;
    for _ in 0..3 {
        let response = get().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key("ratelimit"));
    }
    let metrics = http()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_rate_limit_decisions_total")
                && l.contains("decision=\"fail_open\"")),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn rate_limiting_fails_closed_when_configured_and_redis_is_down() {
    let (mut toggle, app, _upstream) = gateway_behind_toggled_redis("closed", "closed").await;
    let get = || {
        http()
            .get(app.url("/v1/commands/1"))
            .header("authorization", bearer("frank"))
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    toggle.down().await;
    let response = get().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://meridian.dev/problems/dependency-unavailable"
    );
    // Redis back: allowed again, without a restart.
    toggle.up().await;
    common::test_support::wait_until(
        "requests to pass again once Redis is back",
        Duration::from_secs(30),
        || async { get().await.is_ok_and(|r| r.status() == 200) },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_counted_per_address_and_refused_with_429() {
    const BURST: usize = 5;
    let upstream = echo_upstream().await;
    let policies = json!([
        {"name": "per-ip", "key": "ip", "rate": 1, "period": "Hour", "burst": BURST},
        {"name": "per-user", "key": "user", "rate": 1000, "period": "Second"}
    ]);
    let env = [
        ("REDIS_URL", Deps::from_env().redis_url),
        ("REDIS_KEY_PREFIX", prefix("bad-tokens")),
        ("GATEWAY_COMMAND_SERVICE_URL", upstream.url()),
        ("JWT_SECRET", SECRET.to_owned()),
        ("JWT_AUDIENCE", AUDIENCE.to_owned()),
        ("GATEWAY_RATE_LIMITS", policies.to_string()),
        ("GATEWAY_RATE_LIMIT_TIMEOUT_MS", "5000".to_owned()),
    ];
    let (process, base) = spawn_gateway("rl-bad-tokens", &env).await;
    let client = http();
    let mut statuses = Vec::new();
    for i in 0..2 * BURST {
        let response = client
            .get(format!("{base}/v1/commands/{i}"))
            .header("authorization", "Bearer not.a.token")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        // Every answer, refused or not, says where the caller stands.
        let state = members(response.headers()["ratelimit"].to_str().unwrap());
        assert_eq!(state[0].0, "per-ip", "{state:?}");
        if status == 401 {
            assert!(response.headers().contains_key("www-authenticate"));
        } else {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(status);
    }
    let expected: Vec<u16> = [401; BURST].into_iter().chain([429; BURST]).collect();
    assert_eq!(statuses, expected);
    // The address is over its limit for valid tokens too: it is the address that flooded.
    let response = client
        .get(format!("{base}/v1/commands/1"))
        .header("authorization", bearer("erin"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    process.terminate(Duration::from_secs(30)).await;
}
