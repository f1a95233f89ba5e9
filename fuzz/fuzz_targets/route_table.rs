//! The gateway's route table (`GATEWAY_ROUTES`): a table `routes::build` accepts must never
//! make axum panic when its routes are registered (axum panics on conflicting paths, which
//! `build` promises to report as errors first).
#![no_main]

use std::sync::OnceLock;

use api_gateway::routes::{self, RouteSpec};
use axum::routing::any;
use libfuzzer_sys::fuzz_target;
use url::Url;

fn upstreams() -> &'static (Url, Url) {
    static UPSTREAMS: OnceLock<(Url, Url)> = OnceLock::new();
    UPSTREAMS.get_or_init(|| {
        (
            Url::parse("http://127.0.0.1:8082").expect("a valid literal URL"),
            Url::parse("http://127.0.0.1:8085").expect("a valid literal URL"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(specs) = serde_json::from_slice::<Vec<RouteSpec>>(data) else {
        return;
    };
    let (command_service, hub) = upstreams();
    let Ok(table) = routes::build(&specs, command_service, hub) else {
        return;
    };
    let mut router: axum::Router = axum::Router::new();
    for reserved in ["/health", "/ready", "/metrics"] {
        router = router.route(reserved, any(|| async {}));
    }
    for route in &table {
        for pattern in route.patterns() {
            router = router.route(&pattern, any(|| async {}));
        }
    }
    drop(router);
});
