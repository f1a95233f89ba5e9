//! A bearer token as the gateway, the command service and the hub receive it: verification
//! answers with an error (or the claims), never a panic, whatever the header, claims and
//! signature segments hold.
#![no_main]

use std::sync::OnceLock;

use common::auth::{AuthConfig, Verifier};
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (tokio::runtime::Runtime, Verifier) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, Verifier)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        let verifier = Verifier::new(&AuthConfig {
            jwt_secret: Some("a-fuzzing-secret-of-at-least-32-bytes".into()),
            jwt_issuer: Some("https://issuer.example".into()),
            jwt_audience: Some("meridian".into()),
            ..AuthConfig::default()
        })
        .expect("a valid verifier");
        (runtime, verifier)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let (runtime, verifier) = setup();
    if let Ok(claims) = runtime.block_on(verifier.verify(token)) {
        assert!(!claims.sub.is_empty());
    }
});
