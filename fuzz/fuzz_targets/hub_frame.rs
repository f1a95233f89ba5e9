//! A client frame as the hub receives it, as JSON text and as MessagePack: decoding never
//! panics, and a decoded request names its room.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_hub::protocol::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::from_msgpack(data) {
        let _ = (request.room(), request.reference());
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(request) = Request::from_json(text)
    {
        let _ = (request.room(), request.reference());
    }
});
