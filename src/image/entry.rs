//! One member of an image, whatever the format: what the tar reader and the squashfs reader
//! both produce, and what measure and the unpacker consume.

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Fifo => "fifo",
        }
    }
}

/// One archive member with everything its headers said about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The path as the archive spells it (not yet normalized or checked).
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch; seconds may be negative.
    pub mtime: (i64, u32),
    /// Bytes of file content that follow (regular files only; 0 otherwise).
    pub size: u64,
    /// Symlink target or hardlink target path.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes, by name, from `SCHILY.xattr.*` and `LIBARCHIVE.xattr.*`.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For a sparse file: its data segments (offset, length); the rest is holes, and `size`
    /// is the file's real size.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Things about the entry worth a warning (an ACL that could not be used, ...).
    pub notes: Vec<String>,
    /// Metadata the image gives this entry that no Linux filesystem holds (an NFSv4 ACL, an
    /// xattr over 64 KiB), left out of `xattrs`: each its attribute's name and a
    /// description. The request's `unsupported_metadata` decides whether that refuses the
    /// image.
    pub unholdable: Vec<(String, String)>,
    /// Where the entry is described in the image (tar: offset of its first header in the
    /// decompressed stream), for messages.
    pub offset: u64,
}

/// The longest xattr name Linux takes (`XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// The largest xattr value Linux takes (`XATTR_SIZE_MAX`).
pub const XATTR_SIZE_MAX: usize = 64 << 10;

/// Takes out of `xattrs` those no Linux filesystem can hold (a name over 255 bytes, a value
/// over 64 KiB) and returns a description of each, for [`Entry::unholdable`].
pub fn take_unholdable_xattrs(xattrs: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(String, String)> {
    let too_big =
        |name: &[u8], value: &[u8]| name.len() > XATTR_NAME_MAX || value.len() > XATTR_SIZE_MAX;
    let names: Vec<Vec<u8>> = xattrs
        .iter()
        .filter(|(name, value)| too_big(name, value))
        .map(|(name, _)| name.clone())
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let value = xattrs.remove(&name)?;
            let shown = String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned();
            let what = format!(
                "the xattr {shown} ({} bytes of name, {} of value; Linux holds at most {XATTR_NAME_MAX} and {XATTR_SIZE_MAX})",
                name.len(),
                value.len()
            );
            Some((shown, what))
        })
        .collect()
}

impl Entry {
    /// Bytes of content the image holds for this entry (less than `size` for sparse files).
    pub fn data_size(&self) -> u64 {
        match &self.sparse {
            Some(map) => map.iter().map(|&(_, len)| len).sum(),
            None => self.size,
        }
    }

    /// The path for messages: lossy UTF-8, shortened.
    pub fn shown(&self) -> String {
        shown(&self.path)
    }
}

pub fn shown(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s.into_owned()
    }
}
