//! reimage's own stream decoders (compress's LZW, the lzop container): any bytes give output
//! or a clean error, never a panic, and the output stays bounded.
#![no_main]
use std::io::Read;

use libfuzzer_sys::fuzz_target;

fn drain(mut r: impl Read) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 || total > 1 << 20 {
            break;
        }
        total += n;
    }
}

fuzz_target!(|data: &[u8]| {
    drain(reimage::image::lzw::LzwDecoder::new(data));
    drain(reimage::image::lzop::LzopDecoder::new(data));
});
