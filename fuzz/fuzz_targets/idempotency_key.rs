//! The `Idempotency-Key` field: any value is either refused or yields a key of 1 to 255
//! visible ASCII characters.
#![no_main]

use command_service::commands::parse_idempotency_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_idempotency_key(data) {
        assert!((1..=255).contains(&key.len()), "{key:?}");
        assert!(key.chars().all(|c| c.is_ascii_graphic()), "{key:?}");
    }
});
