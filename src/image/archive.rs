//! What the unpacker reads an image through, whatever its format: entries in the order they
//! are to be applied, and each file's content in pieces.

use super::entry::Entry;
use crate::error::Result;

/// The size of the pieces a tar member's content is handed over in.
pub const TAR_PIECE: usize = 1 << 20;

/// Content for one offset of a file: bytes already read, or a deferred step that produces
/// them on a writer thread (reading and decompressing a squashfs block in parallel).
pub enum PieceData {
    Bytes(Vec<u8>),
    Deferred(Box<dyn FnOnce() -> Result<Produced> + Send>),
}

/// What a deferred step produced: the bytes, and the one zstd frame they were decoded from
/// when the image stored them so (a squashfs block), which a filesystem that keeps zstd
/// extents may store as it is instead of the bytes.
pub struct Produced {
    pub bytes: Vec<u8>,
    pub zstd_frame: Option<Vec<u8>>,
}

impl From<Vec<u8>> for Produced {
    fn from(bytes: Vec<u8>) -> Self {
        Produced {
            bytes,
            zstd_frame: None,
        }
    }
}

/// A source of entries in the order they are to be applied: the tar reader, or the squashfs
/// reader's walk of its directory tree.
pub trait Archive {
    fn next_entry(&mut self) -> Result<Option<Entry>>;
    /// The size of the pieces a file's content is handed over in.
    fn piece_size(&self) -> usize;
    /// `len` bytes of the current entry's content at `offset`; pieces are asked for in order.
    /// `buffer` is an empty buffer to fill if the bytes are read now.
    fn piece(&mut self, offset: u64, len: usize, buffer: Vec<u8>) -> Result<PieceData>;
    /// Called after the last entry.
    fn finish(&mut self) -> Result<()>;
    /// Entries the reader passed over rather than hand to the unpacker (squashfs sockets),
    /// as paths, for a warning each.
    fn skipped(&self) -> &[String] {
        &[]
    }
}
