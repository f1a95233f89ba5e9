//! A command body as `POST /v1/commands` receives it: decoding, validation and the request
//! fingerprint never panic, whatever the bytes.
#![no_main]

use command_service::commands::{CommandRequest, fingerprint, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<CommandRequest>(data) {
        let custom = ["archive".to_owned()];
        if validate(&request, &custom).is_ok() {
            assert_eq!(fingerprint(&request).len(), 32);
        }
    }
});
