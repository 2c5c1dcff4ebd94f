//! Storing a zstd frame from the image as a btrfs compressed extent, as it is
//! (`BTRFS_IOC_ENCODED_WRITE`), instead of writing the bytes it decodes to: the filesystem then
//! writes a third of the data, and nothing is compressed again. A squashfs-zstd image's data
//! blocks are such frames.
//!
//! The file reads back exactly as if the bytes had been written, because a frame is stored only
//! when the kernel decodes it to exactly those bytes: it was decoded here already (to exactly the
//! block's length, or the image was refused), it is the block's one and only frame (the kernel
//! decodes one), it needs no dictionary, its window fits what btrfs decodes with (128 KiB), and
//! it is smaller than what it decodes to (btrfs's own rule). Anything else, or a filesystem that
//! refuses the write, gets the decoded bytes written as usual.

use std::fs::File;
use std::os::fd::AsRawFd;

use rustix::io::Errno;

/// The most a btrfs compressed extent holds, decoded; also the largest window btrfs decodes
/// zstd with.
const MAX_EXTENT: usize = 128 * 1024;
/// `BTRFS_ENCODED_IO_COMPRESSION_ZSTD`.
const COMPRESSION_ZSTD: u32 = 2;
/// `BTRFS_IOC_ENCODED_WRITE`: `_IOW(0x94, 64, struct btrfs_ioctl_encoded_io_args)`.
const IOC_ENCODED_WRITE: libc::c_ulong = 0x4080_9440;
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// `struct btrfs_ioctl_encoded_io_args` (128 bytes).
#[repr(C)]
struct EncodedIoArgs {
    iov: *const libc::iovec,
    iovcnt: libc::c_ulong,
    offset: i64,
    flags: u64,
    len: u64,
    unencoded_len: u64,
    unencoded_offset: u64,
    compression: u32,
    encryption: u32,
    reserved: [u8; 64],
}

const _: () = assert!(std::mem::size_of::<EncodedIoArgs>() == 128);

/// Whether files under `dir` are on btrfs, where encoded writes may be tried.
pub fn possible_under(dir: std::os::fd::BorrowedFd<'_>) -> bool {
    // `f_type` is an i64 here and another integer type on other targets.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fstatfs(dir).is_ok_and(|s| s.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// What became of an attempt.
pub enum Outcome {
    /// The frame is the file's content at the offset.
    Stored,
    /// This frame cannot be stored so; write the bytes.
    NotThisOne,
    /// The filesystem stores none (not btrfs, or not allowed); write the bytes, and stop trying.
    NotHere,
}

/// Stores `frame`, which decodes to `decoded_len` bytes, as the content of `file` at `offset`.
pub fn store(
    file: &File,
    offset: u64,
    frame: &[u8],
    decoded_len: usize,
) -> std::io::Result<Outcome> {
    if !storable(frame, decoded_len) || offset % 4096 != 0 {
        return Ok(Outcome::NotThisOne);
    }
    let iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    let args = EncodedIoArgs {
        iov: &iov,
        iovcnt: 1,
        offset: offset as i64,
        flags: 0,
        len: decoded_len as u64,
        unencoded_len: decoded_len as u64,
        unencoded_offset: 0,
        compression: COMPRESSION_ZSTD,
        encryption: 0,
        reserved: [0; 64],
    };
    // SAFETY: `args` and the iovec it points to are valid for the call; the kernel reads them
    // and `frame`, and writes nothing back.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            IOC_ENCODED_WRITE,
            &args as *const EncodedIoArgs,
        )
    };
    if r >= 0 {
        return Ok(Outcome::Stored);
    }
    let e = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO);
    match e {
        Errno::NOTTY | Errno::OPNOTSUPP | Errno::PERM | Errno::NOSYS => Ok(Outcome::NotHere),
        Errno::INVAL => Ok(Outcome::NotThisOne),
        other => Err(std::io::Error::from_raw_os_error(other.raw_os_error())),
    }
}

/// Whether btrfs would decode `frame` to the `decoded_len` bytes it was found to decode to.
fn storable(frame: &[u8], decoded_len: usize) -> bool {
    decoded_len > 0
        && decoded_len <= MAX_EXTENT
        && frame.len() < decoded_len
        && window(frame).is_some_and(|w| w <= MAX_EXTENT as u64)
        && zstd::zstd_safe::find_frame_compressed_size(frame).is_ok_and(|n| n == frame.len())
}

/// The window a zstd frame needs (RFC 8878, 3.1.1.1), when it is a frame without a dictionary.
fn window(frame: &[u8]) -> Option<u64> {
    const MAGIC: u32 = 0xFD2F_B528;
    let magic = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?);
    let descriptor = *frame.get(4)?;
    if magic != MAGIC || descriptor & 0b11 != 0 {
        return None;
    }
    let single_segment = descriptor & 0x20 != 0;
    if single_segment {
        // The window is the content size, in a field of 1, 2, 4 or 8 bytes after the descriptor.
        let size = match descriptor >> 6 {
            0 => u64::from(*frame.get(5)?),
            1 => u64::from(u16::from_le_bytes(frame.get(5..7)?.try_into().ok()?)) + 256,
            2 => u64::from(u32::from_le_bytes(frame.get(5..9)?.try_into().ok()?)),
            _ => u64::from_le_bytes(frame.get(5..13)?.try_into().ok()?),
        };
        return Some(size);
    }
    let w = *frame.get(5)?;
    let base = 1u64 << (10 + u32::from(w >> 3));
    Some(base + (base / 8) * u64::from(w & 7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_compressed_alone_is_storable_and_others_are_not() {
        let data: Vec<u8> = (0..MAX_EXTENT).map(|i| (i % 251) as u8).collect();
        let frame = zstd::bulk::compress(&data, 15).expect("compress");
        assert!(storable(&frame, data.len()));
        // Two frames: the kernel would decode the first only.
        let half = zstd::bulk::compress(&data[..MAX_EXTENT / 2], 3).expect("compress");
        let two = [half.clone(), half].concat();
        assert!(!storable(&two, data.len()));
        // Larger than an extent.
        let big: Vec<u8> = (0..2 * MAX_EXTENT).map(|i| (i % 251) as u8).collect();
        let frame = zstd::bulk::compress(&big, 3).expect("compress");
        assert!(!storable(&frame, big.len()));
        // Not smaller than what it decodes to.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let frame = zstd::bulk::compress(&noise, 1).expect("compress");
        assert!(!storable(&frame, noise.len()) || frame.len() < noise.len());
        // Not a zstd frame.
        assert!(!storable(b"\x28\xb5\x2f\xfd", 4096));
    }
}
