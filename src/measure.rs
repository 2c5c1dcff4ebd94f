//! Measuring an image before anything is touched: how many bytes and inodes it unpacks to, and
//! how much a 4 KiB-block filesystem will allocate for it.
//!
//! Measure reads the archive through the same reader the unpacker uses and applies the same
//! path rules, so an image that would be refused while unpacking is refused here, before the
//! old volume is touched.

use std::fs::File;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::error::{Code, Error, Result};
use crate::image::tar::{Entry, Kind, TarReader};
use crate::image::{self, Compression, Format};
use crate::unpack::path::{normalize, RelPath};

const BLOCK: u64 = 4096;
/// ext4 keeps symlink targets shorter than this inside the inode.
const FAST_SYMLINK_MAX: usize = 59;
/// Xattrs up to about this many bytes fit in a 256-byte inode; more take a block.
const INLINE_XATTR_BYTES: usize = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub unpacked_bytes: u64,
    pub allocated_bytes: u64,
    pub inodes: u64,
    pub entries: u64,
}

impl Tally {
    fn add(&mut self, e: &Entry) {
        self.entries += 1;
        let xattr_bytes: usize = e.xattrs.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
        match e.kind {
            Kind::Hardlink => return,
            Kind::File => {
                self.unpacked_bytes += e.size;
                self.allocated_bytes += e.size.div_ceil(BLOCK) * BLOCK;
            }
            Kind::Dir => self.allocated_bytes += BLOCK,
            Kind::Symlink if e.link.len() > FAST_SYMLINK_MAX => self.allocated_bytes += BLOCK,
            _ => {}
        }
        self.inodes += 1;
        if xattr_bytes > INLINE_XATTR_BYTES {
            self.allocated_bytes += BLOCK;
        }
    }
}

/// What measure found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    pub format: Format,
    pub compression: Compression,
    pub tally: Tally,
    /// The part of the image that becomes the volume root (`rootfs` for a unified
    /// LXD/Incus image), `None` for the whole image.
    pub rootfs_prefix: Option<RelPath>,
}

impl Measurement {
    pub fn empty() -> Self {
        Measurement {
            format: Format::Tar,
            compression: Compression::None,
            tally: Tally::default(),
            rootfs_prefix: None,
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "format": self.format.as_str(),
            "compression": self.compression.as_str(),
            "unpacked_bytes": self.tally.unpacked_bytes,
            "allocated_bytes": self.tally.allocated_bytes,
            "inodes": self.tally.inodes,
            "entries": self.tally.entries,
        });
        if let Some(prefix) = &self.rootfs_prefix {
            v["rootfs_prefix"] = String::from_utf8_lossy(prefix.as_bytes()).into_owned().into();
        }
        v
    }
}

/// Measures a tar image. `prefix_override` is the request's `rootfs_prefix`; without it a
/// unified image (`metadata.yaml` beside `rootfs/`) is detected. `progress` gets
/// (compressed bytes read, image size) now and then.
pub fn measure_tar(
    file: &File,
    compression: Compression,
    prefix_override: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Measurement> {
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let (stream, count) = image::open_stream(file, compression)?;
    let mut reader = TarReader::new(stream);

    let explicit = prefix_override.map(|p| normalize(p.as_bytes())).transpose()?;
    let unified = normalize(b"rootfs")?;
    let mut whole = Tally::default();
    let mut below_prefix = Tally::default();
    let mut has_metadata_yaml = false;
    let mut last_report = 0u64;
    while let Some(entry) = reader.next_entry()? {
        let path = normalize(&entry.path)?;
        if entry.kind == Kind::Hardlink {
            normalize(&entry.link)?;
        }
        whole.add(&entry);
        let prefix = explicit.as_ref().unwrap_or(&unified);
        if path.strip_prefix(prefix).is_some() {
            below_prefix.add(&entry);
        }
        if path.as_bytes() == b"metadata.yaml" && entry.kind == Kind::File {
            has_metadata_yaml = true;
        }
        let read = count.load(Ordering::Relaxed);
        if read - last_report >= 4 << 20 {
            last_report = read;
            progress(read, size);
        }
    }
    progress(size, size);
    let (tally, rootfs_prefix) = match explicit {
        Some(prefix) if prefix.is_root() => (whole, None),
        Some(prefix) => {
            if below_prefix.entries == 0 {
                return Err(Error::new(
                    Code::ImageInvalid,
                    format!("the image has nothing below rootfs_prefix {}", prefix.shown()),
                ));
            }
            (below_prefix, Some(prefix))
        }
        None if has_metadata_yaml && below_prefix.entries > 0 => (below_prefix, Some(unified)),
        None => (whole, None),
    };
    Ok(Measurement { format: Format::Tar, compression, tally, rootfs_prefix })
}
