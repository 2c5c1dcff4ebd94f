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
/// star's layout of a POSIX ustar block: a 131-byte prefix (its last byte NUL), then the
/// access and change times, each octal digits ended by a space (what tells star's headers
/// from other POSIX ones, as GNU tar tells them).
const STAR_PREFIX_LAST: usize = 475;
const STAR_ATIME: Range<usize> = 476..488;
const STAR_CTIME: Range<usize> = 488..500;
/// star's sparse members (`S`) keep their map where the prefix would be: a flag saying an
/// extension block follows, four (offset, size) pairs, and the file's real size.
const STAR_IS_EXTENDED: usize = 355;
const STAR_SPARSE: Range<usize> = 356..452;
const STAR_REAL_SIZE: Range<usize> = 452..464;
/// An old GNU sparse extension block: 21 more pairs and the same flag.
const EXT_SPARSE: Range<usize> = 0..504;
const EXT_IS_EXTENDED: usize = 504;

/// Pairs in each extension block.
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
    /// A header written by star: POSIX ustar with star's time fields (GNU tar's test).
    pub fn is_star(&self) -> bool {
        let octal_then_space = |field: &[u8]| {
            field.first().is_some_and(|b| (b'0'..=b'7').contains(b)) && field.last() == Some(&b' ')
        };
        self.is_posix_ustar()
            && self.0[STAR_PREFIX_LAST] == 0
            && octal_then_space(&self.0[STAR_ATIME])
            && octal_then_space(&self.0[STAR_CTIME])
    }
    /// star's sparse map in the header, where it has one there: the prefix is empty and the
    /// first offset is written out (its eleventh byte set); otherwise the whole map is in
    /// extension blocks.
    pub fn star_sparse(&self) -> Option<&[u8]> {
        let first_offset_written = self.0[STAR_SPARSE.start + 10] != 0;
        (self.0[PREFIX.start] == 0 && first_offset_written).then(|| &self.0[STAR_SPARSE])
    }
    /// Whether an extension block follows, for a star header with its map in it.
    pub fn star_is_extended(&self) -> bool {
        self.0[STAR_IS_EXTENDED] != 0
    }
    pub fn star_real_size(&self) -> &[u8] {
        &self.0[STAR_REAL_SIZE]
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
