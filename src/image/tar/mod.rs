//! A strict streaming tar reader: ustar, GNU (long names and links, base-256 numbers) and PAX
//! (local and global headers), and v7.
//!
//! It decides once, here, what every header means; measure and unpack both read archives
//! through it, so they can never disagree about an entry (the class of bug behind
//! CVE-2025-62518). Every malformed header is `image_invalid` naming its offset, and every
//! variable-size header is bounded.
//!
//! The rule against parser differentials: an archive that GNU tar and bsdtar read the same way
//! is read that way; a construction they resolve differently is refused with `unsafe_image`
//! naming it, since it could show a reviewer one tree and install another. Measured with GNU
//! tar 1.34 and bsdtar 3.6 (`tests/differential.rs` checks every corpus archive against both):
//! - only the last PAX extended header before a member counts, and the last GNU long name or
//!   link; a PAX `path`/`linkpath` beats a GNU long name/link that comes *after* it, while a
//!   long name followed by a PAX path is read two ways (refused);
//! - global headers: GNU tar applies their records to the following members, bsdtar ignores
//!   them, so one that sets anything a member is made of, followed by a member, is refused;
//!   the rest (`comment`, as `git archive` writes) is ignored, also right before the end;
//! - members that carry no data (directories, symlinks, hardlinks, devices, fifos) never
//!   consume data by their header's size field; a PAX `size` on them is read two ways
//!   (refused);
//! - PAX numbers are plain decimal (no sign, space or exponent) and in range; anything else
//!   is refused, as is an empty PAX path, a `LIBARCHIVE.xattr` without its `SCHILY.xattr`
//!   twin, and device numbers in PAX records that differ from the header's.

use std::collections::BTreeMap;
use std::io::{BufRead, ErrorKind};

mod header;

use header::{Header, SparseExtension, EXT_SPARSE_PAIRS};

use super::archive::{Archive, PieceData};
use crate::error::{Code, Error, Result};

const BLOCK: u64 = header::BLOCK as u64;

/// The largest size a member may claim: GNU tar's `off_t` range. Larger sizes are refused,
/// which also keeps every size-plus-padding sum below `u64::MAX`.
const MAX_SIZE: u64 = i64::MAX as u64;

/// Bounds on what one archive may ask for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// GNU long name/link and PAX header bodies.
    pub max_header_bytes: u64,
    /// Number of records in one PAX header.
    pub max_pax_records: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 1 << 20,
            max_pax_records: 10_000,
        }
    }
}

pub use super::entry::{shown, Entry, Kind};

/// `true` when `block` is a plausible tar header (ustar magic or a valid v7 checksum).
pub fn looks_like_tar(block: &[u8]) -> bool {
    if block.len() < BLOCK as usize {
        return false;
    }
    let h = Header(block);
    if h.is_ustar() {
        return true;
    }
    let Ok(stored) = parse_octal(h.checksum()) else {
        return false;
    };
    h.checksum_matches(stored) && h.name()[0] != 0
}

fn parse_octal(field: &[u8]) -> std::result::Result<u64, ()> {
    let mut value: u64 = 0;
    let mut seen = false;
    for &b in field {
        match b {
            b' ' if !seen => continue,
            b'0'..=b'7' => {
                seen = true;
                value = value
                    .checked_mul(8)
                    .ok_or(())?
                    .checked_add(u64::from(b - b'0'))
                    .ok_or(())?;
            }
            0 | b' ' => break,
            _ => return Err(()),
        }
    }
    Ok(value)
}

/// A numeric header field: octal text, or GNU base-256 (high bit set, two's complement).
fn parse_number(field: &[u8]) -> std::result::Result<i128, ()> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            // Big-endian two's complement with the marker bit dropped: 0x80 starts a positive
            // number, 0xff a negative one (whose first byte, read as i8, sign-extends).
            let mut value: i128 = if b & 0x40 != 0 {
                i128::from(b as i8)
            } else {
                i128::from(b & 0x7f)
            };
            for &b in &field[1..] {
                value = value
                    .checked_mul(256)
                    .ok_or(())?
                    .checked_add(i128::from(b))
                    .ok_or(())?;
            }
            Ok(value)
        }
        _ => parse_octal(field).map(i128::from),
    }
}

/// Reads entries from a decompressed tar stream.
pub struct TarReader<R> {
    inner: R,
    limits: Limits,
    /// Bytes consumed from the stream so far.
    offset: u64,
    /// Content bytes of the current entry not yet read, and the padding after them.
    remaining: u64,
    padding: u64,
    /// The first record of the last global header that GNU tar would apply to the members
    /// after it (and bsdtar would not), with the header's offset.
    global_override: Option<(String, u64)>,
    ended: bool,
}

/// What the headers before a member said about it.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: BTreeMap<String, Vec<u8>>,
    /// PAX sparse 0.0 repeats its offset and numbytes records: kept in order here.
    sparse_00: Vec<(String, Vec<u8>)>,
    /// A construction GNU tar and bsdtar read differently, seen among these headers.
    ambiguous: Option<String>,
}

/// Refuses a construction that tools read two ways, naming it.
fn ambiguous(offset: u64, construction: impl std::fmt::Display) -> Error {
    Error::new(
        Code::UnsafeImage,
        format!(
            "tar header at offset {offset}: {construction}; GNU tar and bsdtar read this two ways, so it is refused"
        ),
    )
    .with("offset", offset)
}

/// Whether GNU tar applies a global header's `key` to the members after it: a key it knows
/// that a member is made of. `comment`, `charset`, times that are not restored, and the keys
/// GNU tar does not know (star's `SCHILY.fflags`, `SCHILY.dev`, `SCHILY.ino`, `SCHILY.nlink`,
/// `SCHILY.acl.ace`; `SUN.*`; `LIBARCHIVE.creationtime`) change nothing for either tool,
/// since bsdtar ignores global headers whole. Checked against GNU tar 1.34.
fn applies_to_members(key: &str) -> bool {
    matches!(
        key,
        "path"
            | "linkpath"
            | "size"
            | "uid"
            | "gid"
            | "uname"
            | "gname"
            | "mtime"
            | "SCHILY.devmajor"
            | "SCHILY.devminor"
            | "SCHILY.acl.access"
            | "SCHILY.acl.default"
            | "RHT.security.selinux"
    ) || ["GNU.sparse.", "SCHILY.xattr.", "LIBARCHIVE.xattr."]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

fn invalid(offset: u64, message: impl std::fmt::Display) -> Error {
    Error::new(
        Code::ImageInvalid,
        format!("tar header at offset {offset}: {message}"),
    )
    .with("offset", offset)
}

/// A read failure of the (decompressed) image stream.
pub fn read_error(e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::UnexpectedEof {
        Error::new(Code::ImageInvalid, "the image is truncated")
    } else {
        Error::new(Code::ImageInvalid, format!("cannot read the image: {e}"))
    }
}

impl<R: BufRead> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: R, limits: Limits) -> Self {
        TarReader {
            inner,
            limits,
            offset: 0,
            remaining: 0,
            padding: 0,
            global_override: None,
            ended: false,
        }
    }

    /// Bytes of the decompressed stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(read_error)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let chunk = self.inner.fill_buf().map_err(read_error)?;
            if chunk.is_empty() {
                return Err(read_error(ErrorKind::UnexpectedEof.into()));
            }
            let take = chunk.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.inner.consume(take);
            self.offset += take as u64;
            n -= take as u64;
        }
        Ok(())
    }

    /// Reads the stream to its end after the end-of-archive marker, so that the decompressor
    /// checks its trailing checksum (gzip CRC, xz/zstd/lz4 checks): a corrupt image must not
    /// pass just because its damage lies after the last member. Tar's own padding (zero
    /// blocks up to the record size) is normal; more than `MAX_TRAILER` bytes is not.
    pub fn finish(&mut self) -> Result<()> {
        const MAX_TRAILER: u64 = 64 << 20;
        if !self.ended {
            return Err(Error::internal(
                "finish called before the end of the archive",
            ));
        }
        let mut trailing = 0u64;
        loop {
            let chunk = self.inner.fill_buf().map_err(read_error)?;
            if chunk.is_empty() {
                return Ok(());
            }
            let n = chunk.len();
            self.inner.consume(n);
            trailing += n as u64;
            if trailing > MAX_TRAILER {
                return Err(Error::new(
                    Code::ImageInvalid,
                    format!(
                        "more than {} MiB of data follow the end of the tar archive",
                        MAX_TRAILER >> 20
                    ),
                ));
            }
        }
    }

    /// Bytes of the current entry's content, borrowed from the stream's buffer.
    /// Empty when the content is exhausted. Call [`TarReader::consume`] with what was used.
    pub fn data(&mut self) -> Result<&[u8]> {
        if self.remaining == 0 {
            return Ok(&[]);
        }
        let remaining = self.remaining;
        let chunk = self.inner.fill_buf().map_err(read_error)?;
        if chunk.is_empty() {
            return Err(read_error(ErrorKind::UnexpectedEof.into()));
        }
        let take = chunk
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        Ok(&chunk[..take])
    }

    pub fn consume(&mut self, n: usize) {
        self.inner.consume(n);
        self.offset += n as u64;
        self.remaining -= n as u64;
    }

    /// Reads a whole variable-size header body (long name, PAX) of `size` bytes.
    fn read_body(&mut self, size: u64, at: u64, what: &str) -> Result<Vec<u8>> {
        if size > self.limits.max_header_bytes {
            return Err(invalid(
                at,
                format!(
                    "{what} of {size} bytes exceeds the limit of {}",
                    self.limits.max_header_bytes
                ),
            ));
        }
        let mut body = vec![0u8; size as usize];
        self.read_exact(&mut body)?;
        self.skip(padding_of(size))?;
        Ok(body)
    }

    /// The next member, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.ended {
            return Ok(None);
        }
        let rest = self
            .remaining
            .checked_add(self.padding)
            .ok_or_else(|| Error::internal("member size overflow"))?;
        self.skip(rest)?;
        self.remaining = 0;
        self.padding = 0;
        let mut pending = Pending::default();
        // The first header of this member's group (an L, K or x header, or the member's own).
        let mut first_header: Option<u64> = None;
        loop {
            let at = self.offset;
            let mut block = [0u8; BLOCK as usize];
            match self.inner.fill_buf() {
                Ok([]) if first_header.is_none() => {
                    return Err(Error::new(
                        Code::ImageInvalid,
                        format!("the tar archive ends at offset {at} without its end-of-archive marker (truncated?)"),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(read_error(e)),
            }
            self.read_exact(&mut block)?;
            if block.iter().all(|&b| b == 0) {
                // A global header or volume label right before the end (an empty `git
                // archive`) describes no member; a long name or PAX header does.
                if first_header.is_some() {
                    return Err(invalid(
                        at,
                        "end-of-archive marker inside an entry's headers",
                    ));
                }
                self.ended = true;
                return Ok(None);
            }
            let h = Header(&block);
            let stored =
                parse_octal(h.checksum()).map_err(|_| invalid(at, "unreadable checksum"))?;
            if !h.checksum_matches(stored) {
                return Err(invalid(
                    at,
                    "checksum mismatch (corrupt or not a tar archive)",
                ));
            }
            let size = header_size(&block, at)?;
            let typeflag = h.typeflag();
            if !matches!(typeflag, b'g' | b'V') {
                first_header.get_or_insert(at);
            }
            match typeflag {
                b'L' => {
                    let body = self.read_body(size, at, "GNU long name")?;
                    pending.long_name = Some(trim_nul(body));
                }
                b'K' => {
                    let body = self.read_body(size, at, "GNU long link")?;
                    pending.long_link = Some(trim_nul(body));
                }
                b'x' | b'X' => {
                    let body = self.read_body(size, at, "PAX header")?;
                    // Only the last extended header before a member counts (GNU tar and
                    // bsdtar alike): an earlier one is forgotten whole.
                    pending.pax.clear();
                    pending.sparse_00.clear();
                    pending.ambiguous = None;
                    for (key, value) in parse_pax(&body, at, self.limits.max_pax_records)? {
                        if key == "GNU.sparse.offset" || key == "GNU.sparse.numbytes" {
                            pending.sparse_00.push((key.clone(), value.clone()));
                        }
                        pending.pax.insert(key, value);
                    }
                    // GNU tar lets a PAX path beat an earlier GNU long name; bsdtar keeps the
                    // long name.
                    if pending.long_name.is_some() && pending.pax.contains_key("path") {
                        pending.ambiguous =
                            Some("a GNU long name followed by a PAX path".to_owned());
                    }
                    if pending.long_link.is_some() && pending.pax.contains_key("linkpath") {
                        pending.ambiguous =
                            Some("a GNU long link followed by a PAX linkpath".to_owned());
                    }
                }
                b'g' => {
                    let body = self.read_body(size, at, "PAX global header")?;
                    // GNU tar replaces its whole global set at each global header.
                    self.global_override = parse_pax(&body, at, self.limits.max_pax_records)?
                        .into_iter()
                        .find(|(key, _)| applies_to_members(key))
                        .map(|(key, _)| (key, at));
                }
                b'V' => {
                    // A volume label names the archive, not a member.
                    self.skip(size + padding_of(size))?;
                }
                b'M' | b'N' => {
                    return Err(Error::new(
                        Code::ImageUnsupported,
                        format!(
                            "tar header at offset {at}: multi-volume or old GNU long-name members are not supported"
                        ),
                    ))
                }
                _ => {
                    let entry = self.member(&block, typeflag, size, pending, first_header.unwrap_or(at))?;
                    return Ok(Some(entry));
                }
            }
        }
    }

    fn member(
        &mut self,
        block: &[u8; 512],
        typeflag: u8,
        header_size: u64,
        pending: Pending,
        at: u64,
    ) -> Result<Entry> {
        if let Some((key, global_at)) = &self.global_override {
            return Err(ambiguous(
                at,
                format!("the PAX global header at offset {global_at} sets {key:?} for the members after it"),
            ));
        }
        if let Some(construction) = &pending.ambiguous {
            return Err(ambiguous(at, construction));
        }
        let h = Header(block);
        for key in ["path", "linkpath"] {
            if pending.pax.get(key).is_some_and(|v| v.is_empty()) {
                return Err(ambiguous(at, format!("an empty PAX {key}")));
            }
        }
        let record = |key: &str| -> Option<&Vec<u8>> { pending.pax.get(key) };
        let path = if let Some(p) = record("path") {
            p.clone()
        } else if let Some(p) = pending.long_name.clone() {
            p
        } else {
            let name = field_str(h.name());
            if h.is_posix_ustar() && h.prefix()[0] != 0 {
                let mut full = field_str(h.prefix()).to_vec();
                full.push(b'/');
                full.extend_from_slice(name);
                full
            } else {
                name.to_vec()
            }
        };
        let link = if let Some(l) = record("linkpath") {
            l.clone()
        } else if let Some(l) = pending.long_link.clone() {
            l
        } else {
            field_str(h.linkname()).to_vec()
        };
        let kind = match typeflag {
            b'0' | 0 | b'7' if path.ends_with(b"/") => Kind::Dir,
            b'0' | 0 | b'7' | b'S' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(Error::new(
                    Code::ImageUnsupported,
                    format!(
                        "tar entry {:?} at offset {at}: unknown member type {:?}",
                        shown(&path),
                        other as char
                    ),
                ))
            }
        };
        let number = |key: &str, field: &[u8], what: &str| -> Result<i128> {
            match record(key) {
                Some(text) => pax_number(text, key, at),
                None => parse_number(field).map_err(|_| invalid(at, format!("unreadable {what}"))),
            }
        };
        let id = |value: i128, what: &str| -> Result<u32> {
            u32::try_from(value)
                .ok()
                .filter(|&v| v != u32::MAX)
                .ok_or_else(|| invalid(at, format!("{what} {value} is not a valid id")))
        };
        let uid = id(number("uid", h.uid(), "uid")?, "uid")?;
        let gid = id(number("gid", h.gid(), "gid")?, "gid")?;
        let mode = parse_number(h.mode()).map_err(|_| invalid(at, "unreadable mode"))?;
        let mode = (mode & 0o7777) as u32;
        let mtime = match record("mtime") {
            Some(text) => pax_time(text, at)?,
            None => {
                let secs = parse_number(h.mtime()).map_err(|_| invalid(at, "unreadable mtime"))?;
                (
                    i64::try_from(secs).map_err(|_| invalid(at, "mtime out of range"))?,
                    0,
                )
            }
        };
        let size = match record("size") {
            Some(text) => {
                let size = pax_number(text, "size", at)?;
                u64::try_from(size)
                    .ok()
                    .filter(|&s| s <= MAX_SIZE)
                    .ok_or_else(|| {
                        ambiguous(at, format!("a PAX size of {size}, beyond any file's size"))
                    })?
            }
            None => header_size,
        };
        // Only regular files (and GNU dump directories, whose listing both tools skip) carry
        // data: the others never consume any by their header's size field. A PAX size on them
        // is data to bsdtar and nothing to GNU tar.
        let carries_data = kind == Kind::File || typeflag == b'D';
        if !carries_data && size != 0 && record("size").is_some() {
            return Err(ambiguous(
                at,
                format!("a PAX size of {size} on a {}", kind.as_str()),
            ));
        }
        let size = if carries_data { size } else { 0 };
        let device = |key: &str, field: &[u8]| -> Result<u32> {
            let v = number(key, field, "device number")?;
            u32::try_from(v).map_err(|_| invalid(at, "device number out of range"))
        };
        let (dev_major, dev_minor) = if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            // GNU tar 1.34 ignores these records and bsdtar uses them: they must agree with
            // the header's fields.
            let major = device("SCHILY.devmajor", h.devmajor())?;
            let minor = device("SCHILY.devminor", h.devminor())?;
            let field = |field: &[u8]| parse_number(field).ok();
            if (record("SCHILY.devmajor").is_some()
                && field(h.devmajor()) != Some(i128::from(major)))
                || (record("SCHILY.devminor").is_some()
                    && field(h.devminor()) != Some(i128::from(minor)))
            {
                return Err(ambiguous(
                    at,
                    "PAX device numbers that differ from the header's",
                ));
            }
            (major, minor)
        } else {
            (0, 0)
        };
        let mut xattrs = BTreeMap::new();
        for (key, value) in pending.pax.iter() {
            if let Some(name) = key.strip_prefix("LIBARCHIVE.xattr.") {
                let name = percent_decode(name.as_bytes())
                    .ok_or_else(|| invalid(at, format!("bad xattr name in {key}")))?;
                let value = base64_decode(value)
                    .ok_or_else(|| invalid(at, format!("bad base64 value in {key}")))?;
                xattrs.insert(name, value);
            }
        }
        // SCHILY records are written by GNU tar and bsdtar alike; they win over the
        // LIBARCHIVE copy of the same attribute.
        let mut schily = 0;
        for (key, value) in pending.pax.iter() {
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.insert(name.as_bytes().to_vec(), value.clone());
                schily += 1;
            }
        }
        // bsdtar writes every xattr both ways; GNU tar reads only the SCHILY records.
        if xattrs.len() != schily {
            return Err(ambiguous(
                at,
                "a LIBARCHIVE.xattr record without its SCHILY.xattr twin",
            ));
        }
        // What the sparse formats and ACLs need, taken now: reading a sparse map below
        // needs the reader itself.
        let sparse_name = record("GNU.sparse.name").cloned();
        let pax_sparse = (
            record("GNU.sparse.major").cloned(),
            record("GNU.sparse.minor").cloned(),
            record("GNU.sparse.map").cloned(),
            record("GNU.sparse.realsize")
                .or(record("GNU.sparse.size"))
                .cloned(),
        );
        let acls = [
            (
                "system.posix_acl_access",
                record("SCHILY.acl.access").cloned(),
            ),
            (
                "system.posix_acl_default",
                record("SCHILY.acl.default").cloned(),
            ),
        ];
        let mut notes = Vec::new();
        let mut unholdable = super::entry::take_unholdable_xattrs(&mut xattrs);
        // NFSv4 ACLs (star's and bsdtar's `SCHILY.acl.ace`): no Linux filesystem reimage
        // fills holds them (GNU tar ignores the record, bsdtar fails to set it).
        if record("SCHILY.acl.ace").is_some() {
            unholdable.push((
                "SCHILY.acl.ace".to_owned(),
                "an NFSv4 ACL (SCHILY.acl.ace)".to_owned(),
            ));
        }
        for (name, text) in acls {
            let Some(text) = text else { continue };
            // GNU tar with --xattrs also stores the binary value; that one wins.
            if xattrs.contains_key(name.as_bytes()) {
                continue;
            }
            match super::acl::text_to_xattr(&text) {
                Ok(value) => {
                    xattrs.insert(name.as_bytes().to_vec(), value);
                }
                Err(why) => notes.push(format!(
                    "ACL of {}: {why}; the ACL is not set",
                    shown(&path)
                )),
            }
        }
        let mut path = path;
        let (mut content, skipped) = if kind == Kind::File {
            (size, 0)
        } else {
            (0, size)
        };
        let mut real_size = content;
        let mut sparse = None;
        if kind == Kind::File {
            let real = |text: Option<Vec<u8>>| -> Result<u64> {
                text.as_deref()
                    .and_then(parse_decimal)
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| invalid(at, "a sparse file without a valid real size"))
            };
            let map = match (typeflag, pax_sparse) {
                (b'S', _) => {
                    let number =
                        |f: &[u8]| parse_number(f).ok().and_then(|v| u64::try_from(v).ok());
                    // star's sparse members put the map and the real size elsewhere in the
                    // header, or the whole map in extension blocks (read as GNU tar reads
                    // them); GNU's own in the old GNU places.
                    let (in_header, size_field, mut extended) = if h.is_star() {
                        match h.star_sparse() {
                            Some(pairs) => (pairs, h.star_real_size(), h.star_is_extended()),
                            None => (&[][..], h.star_real_size(), true),
                        }
                    } else {
                        (h.gnu_sparse(), h.gnu_real_size(), h.gnu_is_extended())
                    };
                    let mut map = super::sparse::parse_gnu_entries(
                        in_header,
                        in_header.len() / 24,
                        at,
                        number,
                    )?;
                    real_size = number(size_field)
                        .ok_or_else(|| invalid(at, "unreadable sparse real size"))?;
                    while extended {
                        let mut block = [0u8; BLOCK as usize];
                        self.read_exact(&mut block)?;
                        let ext = SparseExtension(&block);
                        map.extend(super::sparse::parse_gnu_entries(
                            ext.pairs(),
                            EXT_SPARSE_PAIRS,
                            at,
                            number,
                        )?);
                        if map.len() > super::sparse::MAX_SEGMENTS {
                            return Err(invalid(at, "too many sparse segments"));
                        }
                        extended = ext.is_extended();
                    }
                    // GNU tar reads each segment's data from a block boundary, bsdtar (and
                    // star) back to back: they agree only where every segment but the last
                    // fills whole blocks, as the tools that write these members make them.
                    let mut lengths = map.iter().map(|&(_, len)| len).filter(|&len| len > 0);
                    let last = lengths.next_back();
                    if last.is_some() && lengths.any(|len| len % BLOCK != 0) {
                        return Err(ambiguous(
                            at,
                            "a sparse segment that is not whole blocks before the last one",
                        ));
                    }
                    if h.is_star() {
                        // GNU tar makes a star sparse file as long as its map reaches (the
                        // last segment's end, or a final empty segment's offset), whatever
                        // the header's real size says; bsdtar reads none of star's map.
                        real_size = map
                            .iter()
                            .map(|&(offset, len)| offset.saturating_add(len))
                            .max()
                            .unwrap_or(0);
                    }
                    Some(map)
                }
                (_, (Some(major), minor, _, real_text))
                    if major == b"1" && minor.as_deref() == Some(b"0") =>
                {
                    real_size = real(real_text)?;
                    // The map is at the start of the data, padded to a block.
                    let mut consumed = 0u64;
                    let map = super::sparse::parse_10(
                        || {
                            let mut line = Vec::new();
                            loop {
                                if consumed >= content || line.len() > 24 {
                                    return Err(invalid(at, "malformed sparse 1.0 map"));
                                }
                                let mut byte = [0u8; 1];
                                self.read_exact(&mut byte)?;
                                consumed += 1;
                                if byte[0] == b'\n' {
                                    return Ok(line);
                                }
                                line.push(byte[0]);
                            }
                        },
                        at,
                    )?;
                    let pad = padding_of(consumed).min(content - consumed);
                    self.skip(pad)?;
                    content -= consumed + pad;
                    Some(map)
                }
                (_, (_, _, Some(map_text), real_text)) => {
                    real_size = real(real_text)?;
                    Some(super::sparse::parse_01(&map_text, at)?)
                }
                (_, (_, _, None, real_text)) if !pending.sparse_00.is_empty() => {
                    real_size = real(real_text)?;
                    Some(super::sparse::parse_00(&pending.sparse_00, at)?)
                }
                _ => None,
            };
            if let Some(map) = map {
                sparse = Some(super::sparse::validate(map, real_size, content, at)?);
                if let Some(name) = sparse_name {
                    path = name;
                }
            } else {
                real_size = content;
            }
        }
        // Content follows regular files only; a dump directory's listing is skipped, never
        // written.
        self.remaining = content;
        // `size` is 0 for members without data: their header's size field is not data.
        self.padding = skipped + padding_of(size);
        Ok(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            size: real_size,
            link,
            dev_major,
            dev_minor,
            xattrs,
            sparse,
            notes,
            unholdable,
            offset: at,
        })
    }
}

impl<R: BufRead> Archive for TarReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>> {
        TarReader::next_entry(self)
    }

    fn piece_size(&self) -> usize {
        super::archive::TAR_PIECE
    }

    fn piece(&mut self, _offset: u64, len: usize, mut buffer: Vec<u8>) -> Result<PieceData> {
        while buffer.len() < len {
            let data = self.data()?;
            if data.is_empty() {
                return Err(Error::new(
                    Code::ImageInvalid,
                    "an entry's content ends early",
                ));
            }
            let take = data.len().min(len - buffer.len());
            buffer.extend_from_slice(&data[..take]);
            self.consume(take);
        }
        Ok(PieceData::Bytes(buffer))
    }

    /// Drains the stream so that the decompressor verifies its checksum.
    fn finish(&mut self) -> Result<()> {
        TarReader::finish(self)
    }
}

fn padding_of(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn header_size(block: &[u8; 512], at: u64) -> Result<u64> {
    let size = parse_number(Header(block).size()).map_err(|_| invalid(at, "unreadable size"))?;
    let size = u64::try_from(size).map_err(|_| invalid(at, format!("negative size {size}")))?;
    if size > MAX_SIZE {
        return Err(invalid(
            at,
            format!("a size of {size} bytes is out of range"),
        ));
    }
    Ok(size)
}

/// A NUL-terminated header field.
fn field_str(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(end) => &field[..end],
        None => field,
    }
}

fn trim_nul(mut body: Vec<u8>) -> Vec<u8> {
    if let Some(end) = body.iter().position(|&b| b == 0) {
        body.truncate(end);
    }
    body
}

/// Parses PAX records (`"%d %s=%s\n"`), in order.
fn parse_pax(body: &[u8], at: u64, max_records: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let mut into = Vec::new();
    let mut rest = body;
    let mut count = 0;
    while !rest.is_empty() {
        // Some writers pad the body with NULs.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        count += 1;
        if count > max_records {
            return Err(invalid(
                at,
                format!("PAX header has more than {max_records} records"),
            ));
        }
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| invalid(at, "malformed PAX record (no length)"))?;
        let len_text = &rest[..space];
        if len_text.is_empty() || len_text.len() > 12 || !len_text.iter().all(u8::is_ascii_digit) {
            return Err(invalid(at, "malformed PAX record length"));
        }
        let len: usize = std::str::from_utf8(len_text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid(at, "malformed PAX record length"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(invalid(at, "PAX record length does not match its content"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| invalid(at, "malformed PAX record (no '=')"))?;
        let key = std::str::from_utf8(&record[..eq])
            .map_err(|_| invalid(at, "PAX record key is not UTF-8"))?;
        if key.is_empty() {
            return Err(invalid(at, "PAX record with an empty key"));
        }
        into.push((key.to_owned(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(into)
}

/// Plain decimal digits, at most 30 of them (no sign, space or exponent).
fn parse_decimal(text: &[u8]) -> Option<i128> {
    if text.is_empty() || text.len() > 30 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// A PAX numeric record. GNU tar ignores a malformed or out-of-range one (keeping the header's
/// field) where bsdtar reads a prefix of it or nothing: either way, two readings.
fn pax_number(text: &[u8], key: &str, at: u64) -> Result<i128> {
    let value = parse_decimal(text)
        .ok_or_else(|| ambiguous(at, format!("a malformed PAX number {key}={}", shown(text))))?;
    let in_range = match key {
        "uid" | "gid" => value <= i128::from(u32::MAX),
        _ => value <= i128::from(i64::MAX),
    };
    if !in_range {
        return Err(ambiguous(at, format!("PAX {key}={value} is out of range")));
    }
    Ok(value)
}

/// A PAX time. GNU tar rounds a negative time with a fraction down and bsdtar toward zero, so
/// one is refused.
fn pax_time(text: &[u8], at: u64) -> Result<(i64, u32)> {
    let time = parse_pax_time(text)
        .ok_or_else(|| invalid(at, format!("PAX mtime {} is not a time", shown(text))))?;
    if time.0 < 0 && text.contains(&b'.') {
        return Err(ambiguous(
            at,
            format!("a negative PAX mtime with a fraction ({})", shown(text)),
        ));
    }
    Ok(time)
}

/// A PAX time: `[-]seconds[.fraction]`, kept to the nanosecond.
fn parse_pax_time(text: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(text).ok()?;
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    if whole.len() > 19 {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !negative {
        return Some((secs, nanos));
    }
    // -1.25 is 1.25 s before the epoch: seconds -2, nanoseconds 750_000_000.
    if nanos == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nanos))
    }
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s: Vec<u8> = s
        .iter()
        .copied()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_octal(b"0000644\0"), Ok(0o644));
        assert_eq!(parse_octal(b"   755 \0"), Ok(0o755));
        assert_eq!(parse_octal(b"\0\0\0"), Ok(0));
        assert!(parse_octal(b"12a").is_err());
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 0x01;
        big[10] = 0x02;
        assert_eq!(parse_number(&big), Ok(0x0201));
        let neg = [0xffu8; 12];
        assert_eq!(parse_number(&neg), Ok(-1));
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some((1700000000, 123456789))
        );
        assert_eq!(parse_pax_time(b"5"), Some((5, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"1.2.3"), None);
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn pax_records() {
        let m: BTreeMap<String, Vec<u8>> = parse_pax(b"11 path=ab\n16 SCHILY.x=a=b\n", 0, 10)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(m["path"], b"ab");
        assert_eq!(m["SCHILY.x"], b"a=b");
        for bad in [
            &b"99 path=ab\n"[..],
            b"10 path=ab\n",
            b"x path=a\n",
            b"5 =a\n\n",
            b"8 patha\n",
        ] {
            assert!(parse_pax(bad, 0, 10).is_err(), "{bad:?}");
        }
    }

    fn entries(archive: &[u8]) -> Result<Vec<Entry>> {
        let mut reader = TarReader::new(archive);
        let mut out = Vec::new();
        while let Some(e) = reader.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    fn block(name: &[u8], typeflag: u8, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..name.len()].copy_from_slice(name);
        b[100..108].copy_from_slice(b"0000644\0");
        b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[156] = typeflag;
        b[257..265].copy_from_slice(b"ustar\x0000");
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    fn pax(typeflag: u8, records: &[u8]) -> Vec<u8> {
        let mut out = block(b"pax", typeflag, records.len() as u64);
        out.extend_from_slice(records);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    #[test]
    fn an_empty_git_archive_is_read() {
        // `git archive` of an empty tree: a global header with the commit id, then the end.
        let mut archive = pax(
            b'g',
            b"52 comment=0123456789abcdef0123456789abcdef01234567\n",
        );
        archive.extend_from_slice(&[0u8; 1024]);
        assert!(entries(&archive).unwrap().is_empty());
        let mut archive = block(b"label", b'V', 0);
        archive.extend_from_slice(&[0u8; 1024]);
        assert!(entries(&archive).unwrap().is_empty());
    }

    #[test]
    fn ambiguities_are_unsafe() {
        let mut archive = pax(b'g', b"12 uid=4242\n");
        archive.extend(block(b"f", b'0', 0));
        archive.extend_from_slice(&[0u8; 1024]);
        let e = entries(&archive).unwrap_err();
        assert_eq!(e.code, Code::UnsafeImage);
        assert!(e.message.contains("global header"), "{}", e.message);
        let mut archive = pax(b'x', b"12 size=512\n");
        archive.extend(block(b"d/", b'5', 0));
        archive.extend_from_slice(&[0u8; 1024]);
        let e = entries(&archive).unwrap_err();
        assert_eq!(e.code, Code::UnsafeImage);
        assert!(
            e.message.contains("PAX size of 512 on a directory"),
            "{}",
            e.message
        );
    }

    #[test]
    fn header_sizes_of_dataless_members_are_not_data() {
        let mut archive = block(b"d/", b'5', 512);
        archive.extend(block(b"next", b'0', 0));
        archive.extend_from_slice(&[0u8; 1024]);
        let names: Vec<Vec<u8>> = entries(&archive)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(names, vec![b"d/".to_vec(), b"next".to_vec()]);
    }

    #[test]
    fn base64_and_percent() {
        assert_eq!(base64_decode(b"aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode(b"AQID"), Some(vec![1, 2, 3]));
        assert_eq!(percent_decode(b"user.a%3Db"), Some(b"user.a=b".to_vec()));
    }
}
