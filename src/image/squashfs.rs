//! A squashfs 4.0 reader: the superblock, the id, fragment and xattr tables, the inode and
//! directory tables, and data blocks, for every compressor mksquashfs writes (gzip, lzma, lzo,
//! xz, lz4, zstd).
//!
//! The image is hostile. Every table offset and size is checked against the image before it
//! is read, every decompressed block against the size it must have, and the directory walk
//! refuses names that are empty or contain `/`, `.` or `..` (CVE-2021-40153), duplicate names
//! in one directory (CVE-2021-41072), and any directory reached twice (loops). The walk yields
//! [`Entry`] values in directory order, so measure and the unpacker treat squashfs exactly as
//! they treat tar; a second path to an inode becomes a hardlink entry, as in tar.
//!
//! File content is not read during the walk: [`Squashfs::piece`] hands out deferred reads that
//! the unpacker's writer threads run, so blocks are read and decompressed in parallel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::archive::{Archive, PieceData, Produced};
use super::entry::{Entry, Kind};
use crate::error::{Code, Error, Result};

const MAGIC: u32 = 0x7371_7368;
const METADATA_SIZE: usize = 8192;
const INVALID: u32 = 0xffff_ffff;
const NO_TABLE: u64 = u64::MAX;
/// Inode and directory tables larger than this (uncompressed) are refused.
const MAX_TABLE_BYTES: u64 = 512 << 20;
const MAX_LISTING_BYTES: u64 = 64 << 20;
const UNCOMPRESSED_BLOCK: u32 = 1 << 24;
const FRAGMENT_CACHE: usize = 8;
/// Memory an xz or lzma block may ask the decoder for: mksquashfs' dictionaries are at most
/// the block size (1 MiB); a hostile header asking for gigabytes is refused.
const LZMA_MEMLIMIT: u64 = 64 << 20;

fn invalid(message: impl Into<String>) -> Error {
    Error::new(Code::ImageInvalid, format!("squashfs: {}", message.into()))
}

fn unsafe_name(parent: &[u8], name: &[u8], why: &str) -> Error {
    let shown = format!(
        "{}/{}",
        String::from_utf8_lossy(parent),
        String::from_utf8_lossy(name)
    );
    Error::new(
        Code::UnsafeImage,
        format!("squashfs entry {shown:?}: {why}"),
    )
    .with("entry", shown)
}

/// The compressors of squashfs 4.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Lzma,
    Lzo,
    Xz,
    Lz4,
    Zstd,
}

impl Codec {
    fn from_id(id: u16) -> Result<Codec> {
        Ok(match id {
            1 => Codec::Gzip,
            2 => Codec::Lzma,
            3 => Codec::Lzo,
            4 => Codec::Xz,
            5 => Codec::Lz4,
            6 => Codec::Zstd,
            other => {
                return Err(Error::new(
                    Code::ImageUnsupported,
                    format!("squashfs compressor id {other} is unknown"),
                ))
            }
        })
    }

    pub fn compression(self) -> super::Compression {
        use super::Compression as C;
        match self {
            Codec::Gzip => C::Gzip,
            Codec::Lzma => C::Lzma,
            Codec::Lzo => C::Lzo,
            Codec::Xz => C::Xz,
            Codec::Lz4 => C::Lz4,
            Codec::Zstd => C::Zstd,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Lzma => "lzma",
            Codec::Lzo => "lzo",
            Codec::Xz => "xz",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    /// Decompresses one block that must expand to at most `max` bytes.
    fn decompress(self, input: &[u8], max: usize) -> Result<Vec<u8>> {
        let bad = |what: &dyn std::fmt::Display| {
            invalid(format!("corrupt {} block: {what}", self.as_str()))
        };
        // xz and lzma decode straight into a buffer of the largest allowed size, with the
        // decoder's memory bounded.
        let lzma = |mut stream: liblzma::stream::Stream| -> Result<Vec<u8>> {
            use liblzma::stream::{Action, Status};
            let mut out = Vec::with_capacity(max);
            loop {
                let consumed = (stream.total_in() as usize).min(input.len());
                let before = out.len();
                let status = stream
                    .process_vec(&input[consumed..], &mut out, Action::Finish)
                    .map_err(|e| bad(&e))?;
                if status == Status::StreamEnd {
                    return Ok(out);
                }
                if out.len() == out.capacity() {
                    return Err(bad(&"it expands beyond the block size"));
                }
                if out.len() == before && stream.total_in() as usize == consumed {
                    return Err(bad(&"the block is truncated"));
                }
            }
        };
        match self {
            Codec::Gzip => {
                let mut out = Vec::with_capacity(max);
                flate2::read::ZlibDecoder::new(input)
                    .take(max as u64 + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| bad(&e))?;
                if out.len() > max {
                    return Err(bad(&"it expands beyond the block size"));
                }
                Ok(out)
            }
            Codec::Xz => lzma(
                liblzma::stream::Stream::new_stream_decoder(LZMA_MEMLIMIT, 0)
                    .map_err(|e| bad(&e))?,
            ),
            Codec::Lzma => lzma(
                liblzma::stream::Stream::new_lzma_decoder(LZMA_MEMLIMIT).map_err(|e| bad(&e))?,
            ),
            Codec::Zstd => {
                // One decoder context per thread: making one per block costs more than a
                // small block's decoding.
                thread_local! {
                    static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                        const { std::cell::RefCell::new(None) };
                }
                DECODER.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let decoder = match &mut *slot {
                        Some(decoder) => decoder,
                        empty => {
                            empty.insert(zstd::bulk::Decompressor::new().map_err(|e| bad(&e))?)
                        }
                    };
                    decoder.decompress(input, max).map_err(|e| bad(&e))
                })
            }
            Codec::Lz4 => {
                let mut out = vec![0u8; max];
                let n = lz4_flex::block::decompress_into(input, &mut out).map_err(|e| bad(&e))?;
                out.truncate(n);
                Ok(out)
            }
            Codec::Lzo => super::lzo::decompress(input, max).map_err(|why| bad(&why)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Superblock {
    inode_count: u32,
    block_size: u32,
    fragment_count: u32,
    codec: Codec,
    flags: u16,
    id_count: u16,
    root_inode: u64,
    bytes_used: u64,
    id_table: u64,
    xattr_id_table: u64,
    inode_table: u64,
    directory_table: u64,
    fragment_table: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Superblock {
    fn parse(b: &[u8; 96], file_len: u64) -> Result<Superblock> {
        if le32(b, 0) != MAGIC {
            return Err(invalid("bad magic"));
        }
        let (major, minor) = (le16(b, 28), le16(b, 30));
        if (major, minor) != (4, 0) {
            return Err(Error::new(
                Code::ImageUnsupported,
                format!("squashfs {major}.{minor} is not supported (only 4.0)"),
            ));
        }
        let sb = Superblock {
            inode_count: le32(b, 4),
            block_size: le32(b, 12),
            fragment_count: le32(b, 16),
            codec: Codec::from_id(le16(b, 20))?,
            flags: le16(b, 24),
            id_count: le16(b, 26),
            root_inode: le64(b, 32),
            bytes_used: le64(b, 40),
            id_table: le64(b, 48),
            xattr_id_table: le64(b, 56),
            inode_table: le64(b, 64),
            directory_table: le64(b, 72),
            fragment_table: le64(b, 80),
        };
        let block_log = le16(b, 22);
        if !(4096..=(1 << 20)).contains(&sb.block_size)
            || 1u32.checked_shl(u32::from(block_log)) != Some(sb.block_size)
        {
            return Err(invalid(format!("bad block size {}", sb.block_size)));
        }
        if sb.bytes_used > file_len {
            return Err(invalid(format!(
                "the image is truncated ({} bytes, superblock says {})",
                file_len, sb.bytes_used
            )));
        }
        if sb.inode_table >= sb.directory_table
            || sb.directory_table > sb.bytes_used
            || sb.id_table >= sb.bytes_used
        {
            return Err(invalid("table offsets are out of order or out of range"));
        }
        Ok(sb)
    }
}

/// Reads and decompresses metadata blocks of one table, keeping them for reuse.
struct MetaTable {
    start: u64,
    end: u64,
    blocks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    loaded: u64,
}

/// A position in a metadata table: block offset relative to the table start, and offset in
/// the uncompressed block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MetaPos {
    block: u64,
    offset: usize,
}

impl MetaPos {
    fn from_ref(r: u64) -> MetaPos {
        MetaPos {
            block: r >> 16,
            offset: (r & 0xffff) as usize,
        }
    }
}

/// Reads one metadata block at absolute `at`: its data and the absolute offset after it.
fn read_metadata_block(file: &File, codec: Codec, at: u64, end: u64) -> Result<(Vec<u8>, u64)> {
    let mut head = [0u8; 2];
    if at.checked_add(2).is_none_or(|e| e > end) {
        return Err(invalid(format!(
            "metadata block at {at} lies outside its table"
        )));
    }
    file.read_exact_at(&mut head, at)
        .map_err(|e| invalid(format!("read: {e}")))?;
    let word = u16::from_le_bytes(head);
    let size = u64::from(word & 0x7fff);
    if size == 0 || at.checked_add(2 + size).is_none_or(|e| e > end) {
        return Err(invalid(format!("metadata block at {at} has a bad size")));
    }
    let mut raw = vec![0u8; size as usize];
    file.read_exact_at(&mut raw, at + 2)
        .map_err(|e| invalid(format!("read: {e}")))?;
    let data = if word & 0x8000 != 0 {
        raw
    } else {
        codec.decompress(&raw, METADATA_SIZE)?
    };
    Ok((data, at + 2 + size))
}

impl MetaTable {
    fn new(start: u64, end: u64) -> MetaTable {
        MetaTable {
            start,
            end,
            blocks: HashMap::new(),
            loaded: 0,
        }
    }

    fn block(&mut self, file: &File, codec: Codec, rel: u64) -> Result<(Arc<Vec<u8>>, u64)> {
        if let Some((data, next)) = self.blocks.get(&rel) {
            return Ok((data.clone(), *next));
        }
        let at = self
            .start
            .checked_add(rel)
            .ok_or_else(|| invalid("metadata offset overflows"))?;
        let (data, next_abs) = read_metadata_block(file, codec, at, self.end)?;
        self.loaded += data.len() as u64;
        if self.loaded > MAX_TABLE_BYTES {
            return Err(invalid("a metadata table is larger than 512 MiB"));
        }
        let data = Arc::new(data);
        let next = next_abs - self.start;
        self.blocks.insert(rel, (data.clone(), next));
        Ok((data, next))
    }

    /// Reads `len` bytes starting at `pos`, following on into the next blocks; returns them
    /// and the position after them.
    fn read(
        &mut self,
        file: &File,
        codec: Codec,
        mut pos: MetaPos,
        len: usize,
    ) -> Result<(Vec<u8>, MetaPos)> {
        // Grows as the table really yields bytes: `len` comes from the image.
        let mut out = Vec::with_capacity(len.min(1 << 16));
        while out.len() < len {
            let (data, next) = self.block(file, codec, pos.block)?;
            if pos.offset > data.len() {
                return Err(invalid("metadata offset lies beyond its block"));
            }
            let take = (len - out.len()).min(data.len() - pos.offset);
            out.extend_from_slice(&data[pos.offset..pos.offset + take]);
            pos.offset += take;
            if pos.offset == data.len() && out.len() < len {
                pos = MetaPos {
                    block: next,
                    offset: 0,
                };
            }
        }
        Ok((out, pos))
    }
}

/// Reads a lookup table: `count` entries of `size` bytes in metadata blocks whose absolute
/// offsets are listed (as u64) at `index_at`.
fn read_lookup_table(
    file: &File,
    codec: Codec,
    index_at: u64,
    count: u64,
    size: u64,
    end: u64,
) -> Result<Vec<u8>> {
    let bytes = count
        .checked_mul(size)
        .ok_or_else(|| invalid("table size overflows"))?;
    if bytes > MAX_TABLE_BYTES {
        return Err(invalid("a lookup table is too large"));
    }
    let blocks = bytes.div_ceil(METADATA_SIZE as u64);
    if index_at.checked_add(blocks * 8).is_none_or(|e| e > end) {
        return Err(invalid("a lookup table index lies outside the image"));
    }
    let mut index = vec![0u8; (blocks * 8) as usize];
    file.read_exact_at(&mut index, index_at)
        .map_err(|e| invalid(format!("read: {e}")))?;
    let mut out = Vec::with_capacity(bytes as usize);
    for i in 0..blocks as usize {
        let at = le64(&index, i * 8);
        let (data, _) = read_metadata_block(file, codec, at, end)?;
        out.extend_from_slice(&data);
    }
    if (out.len() as u64) < bytes {
        return Err(invalid("a lookup table is shorter than its count"));
    }
    out.truncate(bytes as usize);
    Ok(out)
}

#[derive(Clone, Copy, Debug)]
struct Fragment {
    start: u64,
    size: u32,
}

/// What the writer threads need to read file content: shared, read-only.
pub struct DataReader {
    file: File,
    codec: Codec,
    block_size: u32,
    end: u64,
    fragments: Vec<Fragment>,
    /// The most recently used fragment blocks. Each slot is filled once: a writer that needs
    /// a fragment another writer is decoding waits for it instead of decoding it again.
    fragment_cache: Mutex<Vec<(u32, FragmentSlot)>>,
    /// Bytes of data blocks and fragments read so far, for progress.
    read: Arc<AtomicU64>,
}

type FragmentSlot = Arc<OnceLock<std::result::Result<Arc<Vec<u8>>, Error>>>;

impl DataReader {
    /// Reads one data block of on-disk `size` (with the uncompressed flag) at `at`, which must
    /// expand to exactly `len` bytes.
    fn block(&self, at: u64, size_word: u32, len: usize) -> Result<Produced> {
        let size = u64::from(size_word & !UNCOMPRESSED_BLOCK);
        if size == 0 {
            return Ok(vec![0u8; len].into());
        }
        if size > u64::from(self.block_size) || at.checked_add(size).is_none_or(|e| e > self.end) {
            return Err(invalid(format!(
                "data block at {at} of {size} bytes lies outside the image"
            )));
        }
        let mut raw = vec![0u8; size as usize];
        self.file
            .read_exact_at(&mut raw, at)
            .map_err(|e| invalid(format!("read: {e}")))?;
        self.read.fetch_add(size, Ordering::Relaxed);
        if size_word & UNCOMPRESSED_BLOCK != 0 {
            if raw.len() != len {
                return Err(invalid(format!(
                    "an uncompressed data block holds {} bytes instead of {len}",
                    raw.len()
                )));
            }
            return Ok(raw.into());
        }
        let data = self.codec.decompress(&raw, self.block_size as usize)?;
        if data.len() != len {
            return Err(invalid(format!(
                "a data block expands to {} bytes instead of {len}",
                data.len()
            )));
        }
        Ok(Produced {
            bytes: data,
            zstd_frame: (self.codec == Codec::Zstd).then_some(raw),
        })
    }

    fn fragment(&self, index: u32) -> Result<Arc<Vec<u8>>> {
        let slot = {
            let mut cache = self
                .fragment_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match cache.iter().find(|(i, _)| *i == index) {
                Some((_, slot)) => slot.clone(),
                None => {
                    if cache.len() >= FRAGMENT_CACHE {
                        cache.remove(0);
                    }
                    let slot = FragmentSlot::default();
                    cache.push((index, slot.clone()));
                    slot
                }
            }
        };
        slot.get_or_init(|| self.read_fragment(index).map(Arc::new))
            .clone()
    }

    fn read_fragment(&self, index: u32) -> Result<Vec<u8>> {
        let f = *self
            .fragments
            .get(index as usize)
            .ok_or_else(|| invalid(format!("fragment {index} does not exist")))?;
        let size = u64::from(f.size & !UNCOMPRESSED_BLOCK);
        if size == 0
            || size > u64::from(self.block_size)
            || f.start.checked_add(size).is_none_or(|e| e > self.end)
        {
            return Err(invalid(format!("fragment {index} lies outside the image")));
        }
        let mut raw = vec![0u8; size as usize];
        self.file
            .read_exact_at(&mut raw, f.start)
            .map_err(|e| invalid(format!("read: {e}")))?;
        self.read.fetch_add(size, Ordering::Relaxed);
        if f.size & UNCOMPRESSED_BLOCK != 0 {
            Ok(raw)
        } else {
            self.codec.decompress(&raw, self.block_size as usize)
        }
    }
}

/// Where a regular file's content lies.
#[derive(Clone, Debug)]
struct FileData {
    size: u64,
    /// Absolute offset and on-disk size word of each full block.
    blocks: Vec<(u64, u32)>,
    /// Fragment index and offset of the tail, if the tail is in a fragment.
    fragment: Option<(u32, u32)>,
}

struct Frame {
    path: Vec<u8>,
    entries: Vec<(Vec<u8>, u64)>,
    next: usize,
}

/// An open squashfs image and its directory walk.
pub struct Squashfs {
    file: File,
    sb: Superblock,
    ids: Vec<u32>,
    xattr: Option<(MetaTable, Vec<u8>)>,
    inodes: MetaTable,
    dirs: MetaTable,
    data: Arc<DataReader>,
    // The walk.
    stack: Vec<Frame>,
    started: bool,
    dirs_seen: HashSet<u64>,
    links: HashMap<u32, Vec<u8>>,
    current: Option<FileData>,
    /// Sockets passed over (they belong to running programs).
    pub skipped_sockets: Vec<String>,
}

/// An inode as the walk needs it.
struct Inode {
    kind: u16,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u32,
    number: u32,
    xattr: u32,
    dir: Option<(u64, usize, u64)>,
    file: Option<FileData>,
    link: Vec<u8>,
    dev: u32,
}

impl Squashfs {
    pub fn open(file: &File) -> Result<Squashfs> {
        let file = file
            .try_clone()
            .map_err(|e| invalid(format!("cannot read the image: {e}")))?;
        let len = file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| invalid(format!("stat: {e}")))?;
        let mut head = [0u8; 96];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| invalid("the image is shorter than a superblock"))?;
        let sb = Superblock::parse(&head, len)?;
        let end = sb.bytes_used;
        let codec = sb.codec;
        let ids_raw = read_lookup_table(&file, codec, sb.id_table, u64::from(sb.id_count), 4, end)?;
        let ids = ids_raw.chunks(4).map(|c| le32(c, 0)).collect();
        let fragments = if sb.fragment_count == 0 || sb.fragment_table == NO_TABLE {
            Vec::new()
        } else {
            read_lookup_table(
                &file,
                codec,
                sb.fragment_table,
                u64::from(sb.fragment_count),
                16,
                end,
            )?
            .chunks(16)
            .map(|c| Fragment {
                start: le64(c, 0),
                size: le32(c, 8),
            })
            .collect()
        };
        let xattr = if sb.xattr_id_table == NO_TABLE || sb.flags & 0x0200 != 0 {
            None
        } else {
            if sb.xattr_id_table.checked_add(16).is_none_or(|e| e > end) {
                return Err(invalid("the xattr id table lies outside the image"));
            }
            let mut h = [0u8; 16];
            file.read_exact_at(&mut h, sb.xattr_id_table)
                .map_err(|e| invalid(format!("read: {e}")))?;
            let (table_start, count) = (le64(&h, 0), le32(&h, 8));
            let ids = read_lookup_table(
                &file,
                codec,
                sb.xattr_id_table.saturating_add(16),
                u64::from(count),
                16,
                end,
            )?;
            Some((MetaTable::new(table_start, sb.xattr_id_table), ids))
        };
        let data = Arc::new(DataReader {
            file: file
                .try_clone()
                .map_err(|e| invalid(format!("cannot read the image: {e}")))?,
            codec,
            block_size: sb.block_size,
            end,
            fragments,
            fragment_cache: Mutex::new(Vec::new()),
            read: Arc::new(AtomicU64::new(0)),
        });
        Ok(Squashfs {
            inodes: MetaTable::new(sb.inode_table, sb.directory_table),
            dirs: MetaTable::new(sb.directory_table, end),
            file,
            sb,
            ids,
            xattr,
            data,
            stack: Vec::new(),
            started: false,
            dirs_seen: HashSet::new(),
            links: HashMap::new(),
            current: None,
            skipped_sockets: Vec::new(),
        })
    }

    pub fn codec(&self) -> Codec {
        self.sb.codec
    }

    fn id(&self, index: u16) -> Result<u32> {
        self.ids
            .get(index as usize)
            .copied()
            .ok_or_else(|| invalid(format!("id index {index} is out of range")))
    }

    fn inode(&mut self, reference: u64) -> Result<Inode> {
        let (file, codec) = (&self.file, self.sb.codec);
        let pos = MetaPos::from_ref(reference);
        let (h, pos) = self.inodes.read(file, codec, pos, 16)?;
        let kind = le16(&h, 0);
        let mut inode = Inode {
            kind,
            mode: u32::from(le16(&h, 2) & 0o7777),
            uid: self.id(le16(&h, 4))?,
            gid: self.id(le16(&h, 6))?,
            mtime: le32(&h, 8),
            number: le32(&h, 12),
            xattr: INVALID,
            dir: None,
            file: None,
            link: Vec::new(),
            dev: 0,
        };
        let bs = u64::from(self.sb.block_size);
        let block_list = |table: &mut MetaTable,
                          pos: MetaPos,
                          start: u64,
                          size: u64,
                          fragment: u32|
         -> Result<Vec<(u64, u32)>> {
            let count = if fragment == INVALID {
                size.div_ceil(bs)
            } else {
                size / bs
            };
            if count > (1 << 26) {
                return Err(invalid("a file has too many blocks"));
            }
            let (raw, _) = table.read(file, codec, pos, count as usize * 4)?;
            let mut at = start;
            let mut blocks = Vec::with_capacity((count as usize).min(4096));
            for c in raw.chunks(4) {
                let word = le32(c, 0);
                blocks.push((at, word));
                at = at
                    .checked_add(u64::from(word & !UNCOMPRESSED_BLOCK))
                    .ok_or_else(|| invalid("block offsets overflow"))?;
            }
            Ok(blocks)
        };
        match kind {
            1 => {
                let (b, _) = self.inodes.read(file, codec, pos, 16)?;
                inode.dir = Some((
                    u64::from(le32(&b, 0)),
                    le16(&b, 10) as usize,
                    u64::from(le16(&b, 8)),
                ));
            }
            8 => {
                let (b, _) = self.inodes.read(file, codec, pos, 24)?;
                inode.dir = Some((
                    u64::from(le32(&b, 8)),
                    le16(&b, 18) as usize,
                    u64::from(le32(&b, 4)),
                ));
                inode.xattr = le32(&b, 20);
            }
            2 => {
                let (b, rest) = self.inodes.read(file, codec, pos, 16)?;
                let (start, fragment, offset, size) = (
                    u64::from(le32(&b, 0)),
                    le32(&b, 4),
                    le32(&b, 8),
                    u64::from(le32(&b, 12)),
                );
                let blocks = block_list(&mut self.inodes, rest, start, size, fragment)?;
                inode.file = Some(FileData {
                    size,
                    blocks,
                    fragment: (fragment != INVALID).then_some((fragment, offset)),
                });
            }
            9 => {
                let (b, rest) = self.inodes.read(file, codec, pos, 40)?;
                let (start, size, fragment, offset) =
                    (le64(&b, 0), le64(&b, 8), le32(&b, 28), le32(&b, 32));
                inode.xattr = le32(&b, 36);
                let blocks = block_list(&mut self.inodes, rest, start, size, fragment)?;
                inode.file = Some(FileData {
                    size,
                    blocks,
                    fragment: (fragment != INVALID).then_some((fragment, offset)),
                });
            }
            3 | 10 => {
                let (b, rest) = self.inodes.read(file, codec, pos, 8)?;
                let len = le32(&b, 4) as usize;
                if len == 0 || len > 4095 {
                    return Err(invalid(format!("a symlink target of {len} bytes")));
                }
                let (target, rest) = self.inodes.read(file, codec, rest, len)?;
                inode.link = target;
                if kind == 10 {
                    let (x, _) = self.inodes.read(file, codec, rest, 4)?;
                    inode.xattr = le32(&x, 0);
                }
            }
            4 | 5 | 11 | 12 => {
                let (b, _) = self
                    .inodes
                    .read(file, codec, pos, if kind > 10 { 12 } else { 8 })?;
                inode.dev = le32(&b, 4);
                if kind > 10 {
                    inode.xattr = le32(&b, 8);
                }
            }
            6 | 7 | 13 | 14 => {
                if kind > 7 {
                    let (b, _) = self.inodes.read(file, codec, pos, 8)?;
                    inode.xattr = le32(&b, 4);
                }
            }
            other => return Err(invalid(format!("unknown inode type {other}"))),
        }
        Ok(inode)
    }

    /// The extended attributes with index `index` (`INVALID` for none).
    fn xattrs(&mut self, index: u32) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut out = BTreeMap::new();
        if index == INVALID {
            return Ok(out);
        }
        let (file, codec) = (&self.file, self.sb.codec);
        let Some((table, ids)) = self.xattr.as_mut() else {
            return Err(invalid(
                "an inode has xattrs but the image has no xattr table",
            ));
        };
        let at = index as usize * 16;
        let entry = ids
            .get(at..at + 16)
            .ok_or_else(|| invalid(format!("xattr index {index} is out of range")))?;
        let (reference, count) = (le64(entry, 0), le32(entry, 8));
        if count > 10_000 {
            return Err(invalid("an inode has too many xattrs"));
        }
        let mut pos = MetaPos::from_ref(reference);
        for _ in 0..count {
            let (h, next) = table.read(file, codec, pos, 4)?;
            let (kind, name_len) = (le16(&h, 0), le16(&h, 2) as usize);
            let prefix: &[u8] = match kind & 0xff {
                0 => b"user.",
                1 => b"trusted.",
                2 => b"security.",
                other => return Err(invalid(format!("unknown xattr namespace {other}"))),
            };
            let (name, next) = table.read(file, codec, next, name_len)?;
            let (vh, next) = table.read(file, codec, next, 4)?;
            let value_len = le32(&vh, 0) as usize;
            if value_len > 65536 {
                return Err(invalid("an xattr value is larger than 64 KiB"));
            }
            let (value, next) = table.read(file, codec, next, value_len)?;
            let value = if kind & 0x100 != 0 {
                // Out of line: the value is a reference to where it is stored.
                if value.len() != 8 {
                    return Err(invalid("a bad out-of-line xattr reference"));
                }
                let (vh, vpos) = table.read(file, codec, MetaPos::from_ref(le64(&value, 0)), 4)?;
                let len = le32(&vh, 0) as usize;
                if len > 65536 {
                    return Err(invalid("an xattr value is larger than 64 KiB"));
                }
                table.read(file, codec, vpos, len)?.0
            } else {
                value
            };
            let mut full = prefix.to_vec();
            full.extend_from_slice(&name);
            out.insert(full, value);
            pos = next;
        }
        Ok(out)
    }

    /// The entries of a directory listing: names checked, duplicates refused.
    fn listing(
        &mut self,
        path: &[u8],
        (block, offset, size): (u64, usize, u64),
    ) -> Result<Vec<(Vec<u8>, u64)>> {
        let len = size.saturating_sub(3);
        if len > MAX_LISTING_BYTES {
            return Err(invalid("a directory listing is larger than 64 MiB"));
        }
        let (raw, _) = self.dirs.read(
            &self.file,
            self.sb.codec,
            MetaPos { block, offset },
            len as usize,
        )?;
        let mut entries = Vec::new();
        let mut names = HashSet::new();
        let mut at = 0;
        while at < raw.len() {
            if at + 12 > raw.len() {
                return Err(invalid("a truncated directory header"));
            }
            let count = le32(&raw, at) as usize + 1;
            let start = u64::from(le32(&raw, at + 4));
            at += 12;
            if count > 256 {
                return Err(invalid("a directory header with more than 256 entries"));
            }
            for _ in 0..count {
                if at + 8 > raw.len() {
                    return Err(invalid("a truncated directory entry"));
                }
                let inode_offset = u64::from(le16(&raw, at));
                let name_len = le16(&raw, at + 6) as usize + 1;
                at += 8;
                let name = raw
                    .get(at..at + name_len)
                    .ok_or_else(|| invalid("a truncated directory entry name"))?
                    .to_vec();
                at += name_len;
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(unsafe_name(path, &name, "the name is empty, '.' or '..'"));
                }
                if name.contains(&b'/') || name.contains(&0) {
                    return Err(unsafe_name(path, &name, "the name contains '/' or NUL"));
                }
                if !names.insert(name.clone()) {
                    return Err(unsafe_name(
                        path,
                        &name,
                        "the name appears twice in its directory",
                    ));
                }
                entries.push((name, (start << 16) | inode_offset));
            }
        }
        Ok(entries)
    }

    fn entry_of(&mut self, path: Vec<u8>, inode: Inode) -> Result<Entry> {
        let kind = match inode.kind {
            1 | 8 => Kind::Dir,
            2 | 9 => Kind::File,
            3 | 10 => Kind::Symlink,
            4 | 11 => Kind::BlockDevice,
            5 | 12 => Kind::CharDevice,
            _ => Kind::Fifo,
        };
        let mut xattrs = self.xattrs(inode.xattr)?;
        let unholdable = super::entry::take_unholdable_xattrs(&mut xattrs);
        let dev = inode.dev;
        Ok(Entry {
            path,
            kind,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            mtime: (i64::from(inode.mtime), 0),
            size: inode.file.as_ref().map_or(0, |f| f.size),
            link: inode.link,
            dev_major: (dev >> 8) & 0xfff,
            dev_minor: (dev & 0xff) | ((dev >> 12) & 0xfff00),
            xattrs,
            sparse: None,
            notes: Vec::new(),
            unholdable,
            offset: 0,
        })
    }

    /// The next entry of the walk (directories before what they hold), or `None` at the end.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        self.current = None;
        if !self.started {
            self.started = true;
            let root = self.inode(self.sb.root_inode)?;
            let Some(dir) = root.dir else {
                return Err(invalid("the root inode is not a directory"));
            };
            self.dirs_seen.insert(self.sb.root_inode);
            let entries = self.listing(b"", dir)?;
            let entry = self.entry_of(b".".to_vec(), root)?;
            self.stack.push(Frame {
                path: Vec::new(),
                entries,
                next: 0,
            });
            return Ok(Some(entry));
        }
        loop {
            let Some(frame) = self.stack.last_mut() else {
                return Ok(None);
            };
            if frame.next >= frame.entries.len() {
                self.stack.pop();
                continue;
            }
            let (name, reference) = frame.entries[frame.next].clone();
            frame.next += 1;
            let mut path = frame.path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let inode = self.inode(reference)?;
            if inode.number == 0 || inode.number > self.sb.inode_count {
                return Err(invalid(format!(
                    "inode number {} is out of range",
                    inode.number
                )));
            }
            if let Some(dir) = inode.dir {
                if !self.dirs_seen.insert(reference) {
                    return Err(invalid(format!(
                        "the directory {:?} is reached twice (a loop)",
                        String::from_utf8_lossy(&path)
                    )));
                }
                let entries = self.listing(&path, dir)?;
                let entry = self.entry_of(path.clone(), inode)?;
                self.stack.push(Frame {
                    path,
                    entries,
                    next: 0,
                });
                return Ok(Some(entry));
            }
            if inode.kind == 7 || inode.kind == 14 {
                self.skipped_sockets
                    .push(String::from_utf8_lossy(&path).into_owned());
                continue;
            }
            // A second path to the same inode is a hardlink, as tar would record it.
            if let Some(first) = self.links.get(&inode.number).cloned() {
                let mut entry = self.entry_of(
                    path,
                    Inode {
                        file: None,
                        xattr: INVALID,
                        ..inode
                    },
                )?;
                entry.kind = Kind::Hardlink;
                entry.link = first;
                entry.size = 0;
                entry.xattrs.clear();
                return Ok(Some(entry));
            }
            self.links.insert(inode.number, path.clone());
            let file = inode.file.clone();
            let entry = self.entry_of(path, inode)?;
            self.current = file;
            return Ok(Some(entry));
        }
    }

    /// The count of image bytes read for file content so far.
    pub fn read_counter(&self) -> Arc<AtomicU64> {
        self.data.read.clone()
    }

    pub fn block_size(&self) -> usize {
        self.sb.block_size as usize
    }

    /// A deferred read of the current file's content at `offset` (a multiple of the block
    /// size), `len` bytes: one block, or the tail in a fragment.
    pub fn piece(&self, offset: u64, len: usize) -> Result<PieceData> {
        let file = self
            .current
            .as_ref()
            .ok_or_else(|| Error::internal("no file content to read"))?;
        let index = (offset / u64::from(self.sb.block_size)) as usize;
        let data = self.data.clone();
        if let Some(&(at, word)) = file.blocks.get(index) {
            return Ok(PieceData::Deferred(Box::new(move || {
                data.block(at, word, len)
            })));
        }
        let (fragment, frag_offset) = file
            .fragment
            .ok_or_else(|| invalid("a file is longer than its blocks"))?;
        Ok(PieceData::Deferred(Box::new(move || {
            let block = data.fragment(fragment)?;
            let start = frag_offset as usize;
            block
                .get(start..start + len)
                .map(|tail| tail.to_vec().into())
                .ok_or_else(|| invalid(format!("a file's tail lies outside fragment {fragment}")))
        })))
    }
}
impl Archive for Squashfs {
    fn next_entry(&mut self) -> Result<Option<Entry>> {
        Squashfs::next_entry(self)
    }

    fn piece_size(&self) -> usize {
        self.block_size()
    }

    fn piece(&mut self, offset: u64, len: usize, _buffer: Vec<u8>) -> Result<PieceData> {
        Squashfs::piece(self, offset, len)
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }

    fn skipped(&self) -> &[String] {
        &self.skipped_sockets
    }
}
