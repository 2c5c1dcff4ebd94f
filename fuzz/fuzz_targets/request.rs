//! The request parser: any bytes give a request or `invalid_request`, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = reimage::protocol::request::parse(text) {
            assert_eq!(e.code, reimage::error::Code::InvalidRequest);
        }
    }
});
