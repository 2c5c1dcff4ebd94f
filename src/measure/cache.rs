//! Measurements remembered by image identity, so that a second rebuild from the same image
//! measures in milliseconds instead of decoding the whole image again.
//!
//! The identity is the file's device, inode, size, mtime and ctime (which every write to it
//! changes) plus a hash of its first and last 64 KiB, and the request's `rootfs_prefix` and `idmap` (validation depends on them).
//! A changed image therefore misses the cache; and the unpacker still checks that the image
//! holds no more data than measured. Records live in `state_dir/measure/`, the newest
//! `MAX_RECORDS` are kept.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileExt, MetadataExt};

use reimage_driver::records::RecordDir;
use serde::{Deserialize, Serialize};

use super::{Measurement, Tally, Unholdable};
use crate::image::{Compression, Format};
use crate::unpack::idmap::IdRange;
use crate::unpack::path::{normalize, RelPath};

const MAX_RECORDS: usize = 64;
/// The bytes hashed at each end of the file: enough to tell a replaced header or trailer,
/// little enough to cost nothing (every request that names an image computes its key).
const EDGE: u64 = 64 << 10;
/// Bumped whenever what a measurement contains or validates changes.
const VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    key: String,
    #[serde(flatten)]
    measurement: Stored,
    /// The image file's SHA-256 (absent in records written before it was kept).
    #[serde(default)]
    sha256: Option<String>,
}

/// A measurement as records keep it (here, and beside image volumes).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Stored {
    format: String,
    compression: String,
    unpacked_bytes: u64,
    allocated_bytes: u64,
    inodes: u64,
    entries: u64,
    rootfs_prefix: Option<String>,
    /// Metadata of the image that Linux cannot hold (absent: none, or a record written
    /// before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unholdable: Option<Unholdable>,
}

impl Stored {
    pub fn of(m: &Measurement) -> Stored {
        Stored {
            format: m.format.as_str().into(),
            compression: m.compression.as_str().into(),
            unpacked_bytes: m.tally.unpacked_bytes,
            allocated_bytes: m.tally.allocated_bytes,
            inodes: m.tally.inodes,
            entries: m.tally.entries,
            unholdable: m.unholdable.clone(),
            rootfs_prefix: m
                .rootfs_prefix
                .as_ref()
                .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()),
        }
    }

    /// The measurement, or `None` for a record this version cannot read.
    pub fn measurement(&self) -> Option<Measurement> {
        let rootfs_prefix: Option<RelPath> = match &self.rootfs_prefix {
            Some(p) => Some(normalize(p.as_bytes()).ok()?),
            None => None,
        };
        Some(Measurement {
            format: parse_format(&self.format)?,
            compression: parse_compression(&self.compression)?,
            tally: Tally {
                unpacked_bytes: self.unpacked_bytes,
                allocated_bytes: self.allocated_bytes,
                inodes: self.inodes,
                entries: self.entries,
            },
            unholdable: self.unholdable.clone(),
            rootfs_prefix,
        })
    }
}

/// The cache key of `file` measured with these options, or `None` if the file cannot be read.
pub fn key(file: &File, prefix: Option<&str>, idmap: &[IdRange]) -> Option<String> {
    let meta = file.metadata().ok()?;
    let mut h = DefaultHasher::new();
    (
        VERSION,
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
        .hash(&mut h);
    prefix.hash(&mut h);
    for r in idmap {
        (r.host, r.container, r.count).hash(&mut h);
    }
    let mut buf = vec![0u8; EDGE as usize];
    for offset in [0, meta.len().saturating_sub(EDGE)] {
        let n = file.read_at(&mut buf, offset).ok()?;
        buf[..n].hash(&mut h);
    }
    // Two independent 64-bit hashes make a 128-bit key.
    let first = h.finish();
    first.hash(&mut h);
    Some(format!("{first:016x}{:016x}", h.finish()))
}

fn dir(state: &RecordDir) -> Option<RecordDir> {
    state.sub("measure").ok()
}

fn parse_format(s: &str) -> Option<Format> {
    match s {
        "tar" => Some(Format::Tar),
        "squashfs" => Some(Format::Squashfs),
        _ => None,
    }
}

fn parse_compression(s: &str) -> Option<Compression> {
    Compression::ALL.into_iter().find(|c| c.as_str() == s)
}

/// The remembered measurement for `key`, if any, and the file's SHA-256 if it was kept.
pub fn lookup(state: &RecordDir, key: &str) -> Option<(Measurement, Option<String>)> {
    let bytes = dir(state)?.read(&format!("{key}.json")).ok()??;
    let r: Record = serde_json::from_slice(&bytes).ok()?;
    if r.version != VERSION || r.key != key {
        return None;
    }
    Some((r.measurement.measurement()?, r.sha256))
}

/// Remembers `m` and the file's `sha256` under `key`, best effort (a cache that cannot be
/// written only costs time).
pub fn store(state: &RecordDir, key: &str, m: &Measurement, sha256: &str) {
    let Some(dir) = dir(state) else {
        return;
    };
    let record = Record {
        version: VERSION,
        key: key.to_owned(),
        measurement: Stored::of(m),
        sha256: Some(sha256.to_owned()),
    };
    let Ok(text) = serde_json::to_vec(&record) else {
        return;
    };
    let _ = dir.replace(&format!("{key}.json"), &text, false);
    prune(&dir);
}

fn prune(dir: &RecordDir) {
    let Ok(names) = dir.names() else {
        return;
    };
    let mut records: Vec<(i64, i64, String)> = names
        .into_iter()
        .filter_map(|name| {
            let st = dir.stat(&name).ok()??;
            Some((st.st_mtime, st.st_mtime_nsec as i64, name))
        })
        .collect();
    if records.len() <= MAX_RECORDS {
        return;
    }
    records.sort();
    for (_, _, name) in &records[..records.len() - MAX_RECORDS] {
        let _ = dir.remove(name);
    }
}
