//! Measuring an image before anything is touched: how many bytes and inodes it unpacks to, and
//! how much a 4 KiB-block filesystem will allocate for it.
//!
//! Measure reads the archive through the same reader the unpacker uses and applies the same
//! path rules, so an image that would be refused while unpacking is refused here, before the
//! old volume is touched.

pub mod alongside;
pub mod cache;
pub mod digest;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fs::File;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;

use crate::error::{Code, Error, Result};
use crate::image::tar::{shown, Entry, Kind};
use crate::image::{self, Compression, Detected, Format};
use crate::unpack::idmap::IdMap;
use crate::unpack::path::{normalize, RelPath};

const BLOCK: u64 = 4096;
/// Images with more entries than this are refused (a root filesystem has well under a million).
pub const MAX_ENTRIES: u64 = 20_000_000;
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
    /// Counts one entry. Sizes come from the image, so the sums saturate: an image that
    /// claims more than 2^64 bytes is simply too big for any pool.
    fn add(&mut self, e: &Entry) {
        self.entries += 1;
        let xattr_bytes: usize = e.xattrs.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
        let blocks = |len: u64| len.div_ceil(BLOCK).saturating_mul(BLOCK);
        let allocated = match e.kind {
            Kind::Hardlink => return,
            Kind::File => {
                self.unpacked_bytes = self.unpacked_bytes.saturating_add(e.data_size());
                match &e.sparse {
                    Some(map) => map
                        .iter()
                        .fold(0u64, |sum, &(_, len)| sum.saturating_add(blocks(len))),
                    None => blocks(e.size),
                }
            }
            Kind::Dir => BLOCK,
            Kind::Symlink if e.link.len() > FAST_SYMLINK_MAX => BLOCK,
            _ => 0,
        };
        self.allocated_bytes = self.allocated_bytes.saturating_add(allocated);
        self.inodes += 1;
        if xattr_bytes > INLINE_XATTR_BYTES {
            self.allocated_bytes = self.allocated_bytes.saturating_add(BLOCK);
        }
    }
}

/// What measure found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    pub format: Format,
    pub compression: Compression,
    pub tally: Tally,
    /// Metadata of the image that no Linux filesystem holds (see [`Entry::unholdable`]):
    /// the first item found, and how many there are.
    pub unholdable: Option<Unholdable>,
    /// The part of the image that becomes the volume root (`rootfs` for a unified
    /// LXD/Incus image), `None` for the whole image.
    pub rootfs_prefix: Option<RelPath>,
}

/// The first of an image's metadata items that Linux cannot hold, and their number.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unholdable {
    /// The entry's path, as messages show it.
    pub path: String,
    /// The item's name (an xattr's, or the tar record's).
    pub attribute: String,
    /// What the item is, for the message.
    pub what: String,
    /// How many such items the image has.
    pub count: u64,
}

impl Unholdable {
    /// The request's error for an image with such items (`unsupported_metadata` "fail").
    pub fn refusal(&self) -> Error {
        let more = match self.count {
            0 | 1 => String::new(),
            n => format!(" (and {} more such items)", n - 1),
        };
        Error::new(
            Code::Unsupported,
            format!(
                "entry {} has {}{more}, which no Linux filesystem holds; send \"unsupported_metadata\": \"warn\" to build the volume without it",
                self.path, self.what
            ),
        )
        .with("path", self.path.clone())
        .with("attribute", self.attribute.clone())
    }

    /// The warning for it under `unsupported_metadata` "warn".
    pub fn warning(&self) -> String {
        let more = match self.count {
            0 | 1 => String::new(),
            n => format!("; {} more such items are left out too", n - 1),
        };
        format!(
            "entry {} has {}, which no Linux filesystem holds: it is left out{more}",
            self.path, self.what
        )
    }
}

impl Measurement {
    pub fn empty() -> Self {
        Measurement {
            format: Format::Tar,
            compression: Compression::None,
            tally: Tally::default(),
            unholdable: None,
            rootfs_prefix: None,
        }
    }
}

/// What a path was last made into, as far as the archive alone tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Dir,
    Symlink,
    Other,
}

/// One way of reading the archive (the whole of it, or only below a rootfs prefix): what it
/// adds up to, and the first entry the unpacker would refuse.
///
/// The validator applies the unpacker's rules that do not need the filesystem, so that an
/// image the unpacker would refuse half-way is refused here, before any volume is touched
/// (which matters most for `in-place` rebuilds). Paths are remembered as 64-bit keyed hashes:
/// a collision can only make a check pass here that the unpacker still makes.
struct View {
    prefix: Option<RelPath>,
    tally: Tally,
    seen: HashMap<u64, Seen>,
    error: Option<Error>,
    unholdable: Option<Unholdable>,
}

impl View {
    fn new(prefix: Option<RelPath>) -> Self {
        View {
            prefix,
            tally: Tally::default(),
            seen: HashMap::new(),
            error: None,
            unholdable: None,
        }
    }

    fn key(hasher: &RandomState, path: &RelPath) -> u64 {
        hasher.hash_one(path.as_bytes())
    }

    /// The path inside this view, or `None` when the entry lies outside it.
    fn place(&self, path: &RelPath) -> Option<RelPath> {
        match &self.prefix {
            Some(prefix) => path.strip_prefix(prefix),
            None => Some(path.clone()),
        }
    }

    fn add(&mut self, hasher: &RandomState, entry: &Entry, path: &RelPath, idmap: &IdMap) {
        let Some(path) = self.place(path) else { return };
        self.tally.add(entry);
        for (attribute, what) in &entry.unholdable {
            match &mut self.unholdable {
                Some(first) => first.count += 1,
                None => {
                    self.unholdable = Some(Unholdable {
                        path: path.shown(),
                        attribute: attribute.clone(),
                        what: what.clone(),
                        count: 1,
                    })
                }
            }
        }
        if self.error.is_none() {
            self.error = self.check(hasher, entry, &path, idmap).err();
        }
    }

    fn check(
        &mut self,
        hasher: &RandomState,
        entry: &Entry,
        path: &RelPath,
        idmap: &IdMap,
    ) -> Result<()> {
        let refuse = |code: Code, why: String| {
            Err(Error::new(code, format!("entry {}: {why}", path.shown()))
                .with("entry", path.shown()))
        };
        if path.is_root() && entry.kind != Kind::Dir {
            return refuse(
                Code::UnsafeImage,
                format!("a {} cannot replace the volume root", entry.kind.as_str()),
            );
        }
        for (id, what) in [(entry.uid, "uid"), (entry.gid, "gid")] {
            if idmap.map(id).is_none() {
                return refuse(
                    Code::ImageInvalid,
                    format!("{what} {id} is outside every idmap range"),
                );
            }
        }
        for (name, value) in &entry.xattrs {
            if let Err(why) = idmap.shift_xattr(name, value) {
                return refuse(
                    Code::ImageInvalid,
                    format!("xattr {}: {why}", String::from_utf8_lossy(name)),
                );
            }
        }
        // A parent that is known to be neither a directory nor a symlink cannot hold it.
        if let Some(Seen::Other) = self.ancestor(hasher, path) {
            return refuse(Code::ImageInvalid, "a parent is not a directory".into());
        }
        if entry.kind == Kind::Hardlink {
            let target = normalize(&entry.link)?;
            let Some(target) = self.place(&target) else {
                return refuse(
                    Code::UnsafeImage,
                    format!(
                        "hardlink target {:?} lies outside the unpacked tree",
                        shown(&entry.link)
                    ),
                );
            };
            if target.is_root() {
                return refuse(Code::UnsafeImage, "a hardlink to the volume root".into());
            }
            match self.seen.get(&Self::key(hasher, &target)) {
                Some(Seen::Dir) => {
                    return refuse(
                        Code::UnsafeImage,
                        format!("hardlink to the directory {}", target.shown()),
                    )
                }
                Some(_) => {}
                // Through a symlinked directory the target may exist; the unpacker decides.
                None if self.ancestor(hasher, &target) == Some(Seen::Symlink) => {}
                None => {
                    return refuse(
                        Code::ImageInvalid,
                        format!(
                            "hardlink target {} does not exist (it must come earlier in the image)",
                            target.shown()
                        ),
                    )
                }
            }
        }
        let seen = match entry.kind {
            Kind::Dir => Seen::Dir,
            Kind::Symlink => Seen::Symlink,
            _ => Seen::Other,
        };
        self.seen.insert(Self::key(hasher, path), seen);
        Ok(())
    }

    /// The nearest ancestor of `path` that the archive made into a symlink or a
    /// non-directory, if any.
    fn ancestor(&self, hasher: &RandomState, path: &RelPath) -> Option<Seen> {
        let mut current = path.split_last().map(|(parent, _)| parent);
        while let Some(dir) = current {
            if dir.is_root() {
                return None;
            }
            match self.seen.get(&Self::key(hasher, &dir)) {
                Some(Seen::Dir) => return None,
                Some(other) => return Some(*other),
                None => {}
            }
            current = dir.split_last().map(|(parent, _)| parent);
        }
        None
    }
}

/// Measures an image and validates it against the unpacker's rules (and `idmap`): a tar
/// image by reading it through, a squashfs image from its inode and directory tables alone
/// (no data is read). Without `prefix_override` a unified image (`metadata.yaml` beside
/// `rootfs/`) is detected. `progress` gets (compressed bytes read, image size) now and then
/// while a tar image is read.
pub fn measure_image(
    file: &File,
    detected: Detected,
    prefix_override: Option<&str>,
    idmap: &IdMap,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Measurement> {
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = image::open(file, detected)?;
    let mut last_report = 0u64;
    let mut m = measure_entries(
        &mut || {
            let entry = reader.archive.next_entry()?;
            let read = reader.read.load(Ordering::Relaxed);
            if read - last_report >= 4 << 20 {
                last_report = read;
                progress(read, size);
            }
            if entry.is_none() {
                reader.archive.finish()?;
            }
            Ok(entry)
        },
        prefix_override,
        idmap,
    )?;
    if detected.format == Format::Tar {
        progress(size, size);
    }
    m.format = detected.format;
    m.compression = reader.compression;
    Ok(m)
}

/// Tallies and validates a stream of entries, as the whole image and as the part below a
/// rootfs prefix, and picks the view the unpacker will use.
fn measure_entries(
    next: &mut dyn FnMut() -> Result<Option<Entry>>,
    prefix_override: Option<&str>,
    idmap: &IdMap,
) -> Result<Measurement> {
    let mut measurer = Measurer::new(prefix_override, idmap)?;
    while let Some(entry) = next()? {
        measurer.add(&entry)?;
    }
    measurer.finish()
}

/// Measure's view of an image, entry by entry: what it adds up to as the whole image and as
/// the part below a rootfs prefix, and which of the two the unpacker will use.
pub struct Measurer {
    hasher: RandomState,
    idmap: IdMap,
    /// `Some(root)` is an explicit "the whole image"; `None` asks for detection.
    explicit: Option<RelPath>,
    whole: View,
    below: View,
    has_metadata_yaml: bool,
}

impl Measurer {
    pub fn new(prefix_override: Option<&str>, idmap: &IdMap) -> Result<Self> {
        let explicit = prefix_override
            .map(|p| normalize(p.as_bytes()))
            .transpose()?;
        let below_prefix = match &explicit {
            Some(p) if !p.is_root() => p.clone(),
            _ => normalize(b"rootfs")?,
        };
        Ok(Measurer {
            hasher: RandomState::new(),
            idmap: idmap.clone(),
            explicit,
            whole: View::new(None),
            below: View::new(Some(below_prefix)),
            has_metadata_yaml: false,
        })
    }

    /// The prefix the request fixed (`Some(None)`: the whole image), or `None` when it is
    /// left to detection.
    pub fn requested_prefix(&self) -> Option<Option<RelPath>> {
        self.explicit
            .as_ref()
            .map(|p| (!p.is_root()).then(|| p.clone()))
    }

    /// The prefix a unified image is detected by.
    pub fn detectable_prefix(&self) -> Option<RelPath> {
        self.below.prefix.clone()
    }

    pub fn add(&mut self, entry: &Entry) -> Result<()> {
        if self.whole.tally.entries >= MAX_ENTRIES {
            return Err(Error::new(
                Code::ImageInvalid,
                format!("the image has more than {MAX_ENTRIES} entries"),
            ));
        }
        let path = normalize(&entry.path)?;
        if entry.kind == Kind::Hardlink {
            normalize(&entry.link)?;
        }
        self.whole.add(&self.hasher, entry, &path, &self.idmap);
        self.below.add(&self.hasher, entry, &path, &self.idmap);
        if path.as_bytes() == b"metadata.yaml" && entry.kind == Kind::File {
            self.has_metadata_yaml = true;
        }
        Ok(())
    }

    /// What the view that uses `prefix` adds up to so far.
    pub fn tally_in(&self, prefix: Option<&RelPath>) -> Tally {
        if prefix.is_some() {
            self.below.tally
        } else {
            self.whole.tally
        }
    }

    /// The first refusal so far of the view that uses `prefix`.
    pub fn error_in(&self, prefix: Option<&RelPath>) -> Option<&Error> {
        let view = if prefix.is_some() {
            &self.below
        } else {
            &self.whole
        };
        view.error.as_ref()
    }

    /// The measurement of the view the unpacker uses, or that view's first refusal.
    pub fn finish(self) -> Result<Measurement> {
        let use_below = match &self.explicit {
            Some(prefix) => !prefix.is_root(),
            None => self.has_metadata_yaml && self.below.tally.entries > 0,
        };
        let view = if use_below { self.below } else { self.whole };
        if let Some(e) = view.error {
            return Err(e);
        }
        if view.tally.entries == 0 && view.prefix.is_some() {
            let prefix = view.prefix.as_ref().map(RelPath::shown).unwrap_or_default();
            return Err(Error::new(
                Code::ImageInvalid,
                format!("the image has nothing below rootfs_prefix {prefix}"),
            ));
        }
        Ok(Measurement {
            format: Format::Tar,
            compression: Compression::None,
            tally: view.tally,
            unholdable: view.unholdable,
            rootfs_prefix: view.prefix,
        })
    }
}
