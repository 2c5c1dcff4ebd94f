//! The squashfs reader: any bytes give a walk of entries and blocks or a clean error, never a
//! panic, a loop or an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reimage::image::archive::PieceData;

fuzz_target!(|data: &[u8]| {
    let Ok(fd) = rustix::fs::memfd_create("squashfs", rustix::fs::MemfdFlags::CLOEXEC) else { return };
    let file = std::fs::File::from(fd);
    if std::io::Write::write_all(&mut &file, data).is_err() {
        return;
    }
    let Ok(mut image) = reimage::image::squashfs::Squashfs::open(&file) else { return };
    let block = image.block_size() as u64;
    for _ in 0..10_000 {
        match image.next_entry() {
            Ok(Some(entry)) if entry.kind == reimage::image::entry::Kind::File => {
                let mut offset = 0;
                while offset < entry.size.min(64 << 20) {
                    let len = (entry.size - offset).min(block) as usize;
                    match image.piece(offset, len) {
                        Ok(PieceData::Deferred(read)) => {
                            let _ = read();
                        }
                        Ok(PieceData::Bytes(_)) => {}
                        Err(_) => break,
                    }
                    offset += block;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
