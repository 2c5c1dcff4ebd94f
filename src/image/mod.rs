//! Images: what format an image file is, and its decompressed byte stream.
//!
//! The format is decided by magic bytes only (never by the file name). Decompression happens
//! in-process: reimage never runs an external program on an untrusted image.

pub mod acl;
pub mod entry;
pub mod lzo;
pub mod readahead;
pub mod sparse;
pub mod squashfs;
pub mod tar;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Code, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Tar,
    Squashfs,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::Squashfs => "squashfs",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lz4,
    /// squashfs only.
    Lzma,
    /// squashfs only.
    Lzo,
}

impl Compression {
    pub const ALL: [Compression; 8] = [
        Compression::None,
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Lz4,
        Compression::Lzma,
        Compression::Lzo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Lz4 => "lz4",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detected {
    pub format: Format,
    pub compression: Compression,
}

/// Reads the first bytes of `file` (without moving its offset) and names its format.
pub fn detect(file: &File) -> Result<Detected> {
    let mut head = [0u8; 512];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::new(
                    Code::ImageInvalid,
                    format!("cannot read the image: {e}"),
                ))
            }
        }
    }
    let head = &head[..filled];
    let compressed = |compression| {
        Ok(Detected {
            format: Format::Tar,
            compression,
        })
    };
    if head.is_empty() {
        return Err(Error::new(Code::ImageInvalid, "the image is empty"));
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return compressed(Compression::Gzip);
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return compressed(Compression::Xz);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return compressed(Compression::Zstd);
    }
    if head.starts_with(b"BZh") {
        return compressed(Compression::Bzip2);
    }
    if head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        return compressed(Compression::Lz4);
    }
    if head.starts_with(b"hsqs") {
        return Ok(Detected {
            format: Format::Squashfs,
            compression: Compression::None,
        });
    }
    if head.starts_with(b"QFI\xfb") {
        return Err(Error::new(
            Code::ImageUnsupported,
            "this is a qcow2 disk image; reimage fills filesystem volumes from tar or squashfs images",
        ));
    }
    if tar::looks_like_tar(head) {
        return Ok(Detected {
            format: Format::Tar,
            compression: Compression::None,
        });
    }
    Err(Error::new(
        Code::ImageInvalid,
        "the image is neither a tar archive (plain, gzip, xz, zstd, bzip2, lz4) nor squashfs",
    ))
}

fn no_thread(e: std::io::Error) -> Error {
    Error::internal(format!("cannot start the decoder thread: {e}"))
}

/// Memory an xz stream may ask the decoder for.
const XZ_MEMLIMIT: u64 = 512 << 20;

/// Reads an image from its start with `pread`, independent of any shared file offset, and
/// counts the (compressed) bytes read for progress.
struct ImageFile {
    file: File,
    offset: u64,
    read: Arc<AtomicU64>,
}

impl Read for ImageFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The decompressed byte stream of a tar image, decoded ahead on its own thread, and a
/// counter of the image bytes read so far.
pub fn open_stream(
    file: &File,
    compression: Compression,
) -> Result<(Box<dyn BufRead + Send>, Arc<AtomicU64>)> {
    const BUF: usize = 1 << 20;
    let file = file
        .try_clone()
        .map_err(|e| Error::new(Code::ImageInvalid, format!("cannot read the image: {e}")))?;
    let read = Arc::new(AtomicU64::new(0));
    let raw = BufReader::with_capacity(
        BUF,
        ImageFile {
            file,
            offset: 0,
            read: read.clone(),
        },
    );
    let decoded: Box<dyn Read + Send> = match compression {
        Compression::None => return Ok((Box::new(raw), read)),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Xz => {
            // Bounded: a hostile header may ask for gigabytes of dictionary (xz -9 needs 64 MiB).
            let stream = liblzma::stream::Stream::new_stream_decoder(
                XZ_MEMLIMIT,
                liblzma::stream::CONCATENATED,
            )
            .map_err(|e| {
                Error::new(Code::ImageInvalid, format!("cannot start xz decoding: {e}"))
            })?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(raw, stream))
        }
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| {
                Error::new(
                    Code::ImageInvalid,
                    format!("cannot start zstd decoding: {e}"),
                )
            })?)
        }
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(raw)),
        Compression::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(raw)),
        Compression::Lzma | Compression::Lzo => {
            return Err(Error::new(
                Code::ImageUnsupported,
                "lzma and lzo are supported inside squashfs only",
            ))
        }
    };
    Ok((
        Box::new(readahead::ReadAhead::spawn(decoded).map_err(no_thread)?),
        read,
    ))
}
