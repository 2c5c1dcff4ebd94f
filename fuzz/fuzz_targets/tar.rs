//! The tar reader and the path rules: any bytes give entries or a clean error, never a panic
//! or a read past what the headers allow.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = reimage::image::tar::TarReader::new(std::io::Cursor::new(data));
    for _ in 0..10_000 {
        match reader.next_entry() {
            Ok(Some(entry)) => {
                let _ = reimage::unpack::path::normalize(&entry.path);
                let _ = reimage::unpack::path::normalize(&entry.link);
                while let Ok(chunk) = reader.data() {
                    if chunk.is_empty() {
                        break;
                    }
                    let n = chunk.len();
                    reader.consume(n);
                }
            }
            Ok(None) => {
                let _ = reader.finish();
                break;
            }
            Err(_) => break,
        }
    }
});
