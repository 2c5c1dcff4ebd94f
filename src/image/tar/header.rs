//! The fields of a 512-byte tar header block, by name: ustar's layout, with the places GNU
//! tar uses for its old sparse maps. Each accessor returns the raw field; what the bytes mean
//! (octal, base-256, NUL-terminated text) is decided by the reader.

use std::ops::Range;

pub const BLOCK: usize = 512;

const NAME: Range<usize> = 0..100;
const MODE: Range<usize> = 100..108;
const UID: Range<usize> = 108..116;
const GID: Range<usize> = 116..124;
const SIZE: Range<usize> = 124..136;
const MTIME: Range<usize> = 136..148;
pub const CHECKSUM: Range<usize> = 148..156;
const TYPEFLAG: usize = 156;
const LINKNAME: Range<usize> = 157..257;
/// `ustar\0` (POSIX) or `ustar ` (GNU, followed by ` \0` as its version).
const MAGIC: Range<usize> = 257..263;
const DEVMAJOR: Range<usize> = 329..337;
const DEVMINOR: Range<usize> = 337..345;
/// POSIX ustar only: the part of the path before `name`.
const PREFIX: Range<usize> = 345..500;
/// Old GNU sparse members (`S`): four (offset, size) pairs, a flag saying an extension block
/// follows, and the file's real size.
const GNU_SPARSE: Range<usize> = 386..482;
const GNU_IS_EXTENDED: usize = 482;
const GNU_REAL_SIZE: Range<usize> = 483..495;
/// An old GNU sparse extension block: 21 more pairs and the same flag.
const EXT_SPARSE: Range<usize> = 0..504;
const EXT_IS_EXTENDED: usize = 504;

/// Pairs in the header's own sparse map, and in each extension block.
pub const GNU_SPARSE_PAIRS: usize = 4;
pub const EXT_SPARSE_PAIRS: usize = 21;

/// One header block.
pub struct Header<'a>(pub &'a [u8]);

impl Header<'_> {
    pub fn name(&self) -> &[u8] {
        &self.0[NAME]
    }
    pub fn mode(&self) -> &[u8] {
        &self.0[MODE]
    }
    pub fn uid(&self) -> &[u8] {
        &self.0[UID]
    }
    pub fn gid(&self) -> &[u8] {
        &self.0[GID]
    }
    pub fn size(&self) -> &[u8] {
        &self.0[SIZE]
    }
    pub fn mtime(&self) -> &[u8] {
        &self.0[MTIME]
    }
    pub fn checksum(&self) -> &[u8] {
        &self.0[CHECKSUM]
    }
    pub fn typeflag(&self) -> u8 {
        self.0[TYPEFLAG]
    }
    pub fn linkname(&self) -> &[u8] {
        &self.0[LINKNAME]
    }
    /// A ustar header of either flavour (POSIX or GNU).
    pub fn is_ustar(&self) -> bool {
        &self.0[MAGIC.start..MAGIC.end - 1] == b"ustar"
    }
    /// A POSIX ustar header, whose `prefix` field holds part of the path.
    pub fn is_posix_ustar(&self) -> bool {
        &self.0[MAGIC] == b"ustar\0"
    }
    pub fn devmajor(&self) -> &[u8] {
        &self.0[DEVMAJOR]
    }
    pub fn devminor(&self) -> &[u8] {
        &self.0[DEVMINOR]
    }
    pub fn prefix(&self) -> &[u8] {
        &self.0[PREFIX]
    }
    pub fn gnu_sparse(&self) -> &[u8] {
        &self.0[GNU_SPARSE]
    }
    pub fn gnu_is_extended(&self) -> bool {
        self.0[GNU_IS_EXTENDED] != 0
    }
    pub fn gnu_real_size(&self) -> &[u8] {
        &self.0[GNU_REAL_SIZE]
    }
    /// Whether the stored checksum matches the block, summed with bytes as unsigned or (as
    /// some old tars did) as signed, the checksum field counted as spaces.
    pub fn checksum_matches(&self, stored: u64) -> bool {
        let mut unsigned: u64 = 0;
        let mut signed: i64 = 0;
        for (i, &b) in self.0[..BLOCK].iter().enumerate() {
            let b = if CHECKSUM.contains(&i) { b' ' } else { b };
            unsigned += u64::from(b);
            signed += i64::from(b as i8);
        }
        stored == unsigned || stored as i64 == signed
    }
}

/// One old GNU sparse extension block.
pub struct SparseExtension<'a>(pub &'a [u8; BLOCK]);

impl SparseExtension<'_> {
    pub fn pairs(&self) -> &[u8] {
        &self.0[EXT_SPARSE]
    }
    pub fn is_extended(&self) -> bool {
        self.0[EXT_IS_EXTENDED] != 0
    }
}
