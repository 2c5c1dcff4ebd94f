//! Images: what format an image file is, its decompressed byte stream, and the reader for
//! its format ([`open`]).
//!
//! The format is decided by magic bytes only (never by the file name). Decompression happens
//! in-process: reimage never runs an external program on an untrusted image.

pub mod acl;
pub mod archive;
pub mod entry;
pub mod lz4;
pub mod lzo;
pub mod lzop;
pub mod lzw;
pub mod readahead;
pub mod sparse;
pub mod squashfs;
pub mod tar;
pub mod xz;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Code, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lz4,
    /// Legacy `.lzma` (lzma-alone) for tar; LZMA blocks inside squashfs.
    Lzma,
    /// lzop (`.lzo`) for tar; LZO1X blocks inside squashfs.
    Lzo,
    /// `compress` (`.Z`), tar only.
    Compress,
    /// lzip (`.lz`), tar only.
    Lzip,
}

impl Compression {
    pub const ALL: [Compression; 10] = [
        Compression::None,
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Lz4,
        Compression::Lzma,
        Compression::Lzo,
        Compression::Compress,
        Compression::Lzip,
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
            Compression::Compress => "compress",
            Compression::Lzip => "lzip",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detected {
    pub format: Format,
    pub compression: Compression,
}

/// zstd and lz4 share skippable frames (magic `0x184D2A50`–`5F`, little-endian), which
/// `pzstd` writes first: the format is that of the first frame after them.
fn skippable(head: &[u8]) -> Option<u64> {
    let magic = u32::from_le_bytes(head.get(..4)?.try_into().ok()?);
    if magic & 0xffff_fff0 != 0x184d_2a50 {
        return None;
    }
    let len = u32::from_le_bytes(head.get(4..8)?.try_into().ok()?);
    Some(8 + u64::from(len))
}

/// Formats reimage recognises but does not read, and what to do instead.
const UNSUPPORTED: &[(&[u8], usize, &str)] = &[
    (b"QFI\xfb", 0, "a qcow2 disk image"),
    (b"PK\x03\x04", 0, "a zip archive"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive"),
    (b"Rar!\x1a\x07", 0, "a RAR archive"),
    (b"070707", 0, "a cpio archive"),
    (b"070701", 0, "a cpio archive"),
    (b"070702", 0, "a cpio archive"),
    (b"\xc7\x71", 0, "a binary cpio archive"),
    (
        b"sqsh",
        0,
        "a big-endian (version 3 or older) squashfs image",
    ),
    (b"xar!", 0, "a xar archive"),
    (b"KDMV", 0, "a VMDK disk image"),
    (b"conectix", 0, "a VHD disk image"),
    (b"\xe2\xe1\xf5\xe0", 1024, "an EROFS image"),
    (b"\x53\xef", 1080, "an ext2/3/4 filesystem image"),
    (b"CD001", 32769, "an ISO 9660 image"),
];

fn read_head(file: &File, at: u64, len: usize) -> Result<Vec<u8>> {
    let mut head = vec![0u8; len];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], at + filled as u64) {
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
    head.truncate(filled);
    Ok(head)
}

/// Whether `head` starts like a legacy `.lzma` file (lzma-alone): a properties byte with
/// lc+lp+pb in range, a dictionary size of 2^n or 2^n+2^(n-1), an uncompressed size that is
/// unknown or plausible, and the range coder's first byte, always 0 — liblzma's and
/// libarchive's own test.
fn looks_like_lzma_alone(head: &[u8]) -> bool {
    if head.len() < 14 || head[0] >= 9 * 5 * 5 || head[13] != 0 {
        return false;
    }
    let dict = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    let shape = dict.is_power_of_two() || (dict & (dict - 1)).is_power_of_two();
    let size = u64::from_le_bytes(head[5..13].try_into().unwrap_or([0; 8]));
    shape && dict >= 1 << 12 && (size == u64::MAX || size < 1 << 48)
}

/// Reads the first bytes of `file` (without moving its offset) and names its format.
pub fn detect(file: &File) -> Result<Detected> {
    let mut head = read_head(file, 0, 512)?;
    let compressed = |compression| {
        Ok(Detected {
            format: Format::Tar,
            compression,
        })
    };
    if head.is_empty() {
        return Err(Error::new(Code::ImageInvalid, "the image is empty"));
    }
    // Skip leading skippable frames (a bounded number) to see which codec follows.
    let mut at = 0u64;
    for _ in 0..16 {
        let Some(len) = skippable(&head) else { break };
        at += len;
        head = read_head(file, at, 16)?;
        if head.len() < 4 {
            return Err(Error::new(
                Code::ImageInvalid,
                "the image holds only skippable zstd/lz4 frames",
            ));
        }
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return compressed(Compression::Zstd);
    }
    if head.starts_with(&lz4::FRAME_MAGIC) {
        return compressed(Compression::Lz4);
    }
    if at > 0 {
        return Err(Error::new(
            Code::ImageInvalid,
            "skippable frames are followed by neither a zstd nor an lz4 frame",
        ));
    }
    if head.starts_with(&lz4::LEGACY_MAGIC) {
        return compressed(Compression::Lz4);
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return compressed(Compression::Gzip);
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return compressed(Compression::Xz);
    }
    if head.starts_with(b"BZh") {
        return compressed(Compression::Bzip2);
    }
    if lzw::is_compress(&head) {
        return compressed(Compression::Compress);
    }
    if head.starts_with(b"LZIP") {
        return compressed(Compression::Lzip);
    }
    if head.starts_with(&lzop::MAGIC) {
        return compressed(Compression::Lzo);
    }
    if head.starts_with(b"hsqs") {
        return Ok(Detected {
            format: Format::Squashfs,
            compression: Compression::None,
        });
    }
    if tar::looks_like_tar(&head) {
        return Ok(Detected {
            format: Format::Tar,
            compression: Compression::None,
        });
    }
    for (magic, offset, what) in UNSUPPORTED {
        if read_head(file, *offset as u64, magic.len())? == *magic {
            return Err(Error::new(
                Code::ImageUnsupported,
                format!(
                    "this is {what}; reimage fills volumes from tar archives (plain or compressed) and squashfs images"
                ),
            ));
        }
    }
    if looks_like_lzma_alone(&head) {
        return compressed(Compression::Lzma);
    }
    Err(Error::new(
        Code::ImageInvalid,
        "the image is neither a tar archive (plain, gzip, xz, zstd, bzip2, lz4, lzma, lzip, lzop, compress) nor squashfs",
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

/// An image opened for reading, whatever its format.
pub struct Reader {
    pub archive: Box<dyn archive::Archive + Send>,
    /// The image file's bytes read so far, before decompression (a squashfs image: the bytes
    /// of file content, not of its tables).
    pub read: Arc<AtomicU64>,
    /// How the content is compressed (a squashfs image: its codec).
    pub compression: Compression,
}

/// The reader for the format `detected` names.
pub fn open(file: &File, detected: Detected) -> Result<Reader> {
    match detected.format {
        Format::Tar => {
            let (stream, read) = open_stream(file, detected.compression)?;
            Ok(Reader {
                archive: Box::new(tar::TarReader::new(stream)),
                read,
                compression: detected.compression,
            })
        }
        Format::Squashfs => {
            let image = squashfs::Squashfs::open(file)?;
            Ok(Reader {
                compression: image.codec().compression(),
                read: image.read_counter(),
                archive: Box::new(image),
            })
        }
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
        // Bounded: a hostile header may ask for gigabytes of dictionary (xz -9 needs 64 MiB).
        Compression::Xz => Box::new(
            xz::XzStreams::new(raw, XZ_MEMLIMIT)
                .map_err(|e| Error::new(Code::ImageInvalid, e.to_string()))?,
        ),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| {
                Error::new(
                    Code::ImageInvalid,
                    format!("cannot start zstd decoding: {e}"),
                )
            })?)
        }
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(raw)),
        Compression::Lz4 => lz4::decoder(raw).map_err(|e| {
            Error::new(
                Code::ImageInvalid,
                format!("cannot start lz4 decoding: {e}"),
            )
        })?,
        Compression::Lzip | Compression::Lzma => {
            let stream = if compression == Compression::Lzip {
                liblzma::stream::Stream::new_lzip_decoder(
                    XZ_MEMLIMIT,
                    liblzma::stream::CONCATENATED,
                )
            } else {
                liblzma::stream::Stream::new_lzma_decoder(XZ_MEMLIMIT)
            }
            .map_err(|e| {
                Error::new(
                    Code::ImageInvalid,
                    format!("cannot start {} decoding: {e}", compression.as_str()),
                )
            })?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(raw, stream))
        }
        Compression::Compress => Box::new(lzw::LzwDecoder::new(raw)),
        Compression::Lzo => Box::new(lzop::LzopDecoder::new(raw)),
    };
    Ok((
        Box::new(readahead::ReadAhead::spawn(decoded).map_err(no_thread)?),
        read,
    ))
}
