//! The parallel parts of unpacking, and the bounds that keep its memory fixed.
//!
//! Three stages run at once:
//! 1. a decoder thread reads and decompresses the image into 1 MiB blocks
//!    ([`crate::image::readahead::ReadAhead`]);
//! 2. the calling thread parses headers and does every namespace operation (create, mkdir,
//!    link, replace) in archive order, so duplicate and replacement semantics are exactly those
//!    of a sequential unpack;
//! 3. writer threads ([`Writers`]) receive `(file, offset, bytes)` jobs and `pwrite` them; the
//!    writer that completes a file applies its metadata (owner, mode, xattrs, times) and closes
//!    it. Writes are positional, so the chunks of one large file can go to several writers.
//!
//! Memory is bounded by the queues: a few decoded blocks and `JOBS_IN_FLIGHT` chunks of at
//! most `CHUNK` bytes, whatever the image's size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use rustix::io::Errno;

use super::encoded;
use super::fs::{apply_meta_fd, Born, Meta, XattrFailure};
use super::path::RelPath;
use crate::error::{Code, Error, Result};
use crate::image::archive::PieceData;

/// File content handed to a writer at a time (a multiple of the 4 KiB hole granularity).
pub const CHUNK: usize = 1 << 20;
const JOBS_IN_FLIGHT: usize = 16;
/// Runs of zeros this long and aligned are left as holes instead of written.
const HOLE: usize = 4096;

/// A regular file whose content is being written by the writers.
pub struct PendingFile {
    pub file: File,
    pub meta: Meta,
    /// Owner and mode the file was created with (see [`Born`]).
    pub born: Born,
    pub path: RelPath,
    pub size: u64,
    /// Chunks not yet written; the writer that takes this to zero finishes the file.
    pub remaining: AtomicUsize,
}

/// The bytes a piece is expected to hold, for batching (a deferred squashfs block is
/// usually compressed to about a quarter).
fn len_hint(data: &PieceData) -> usize {
    match data {
        PieceData::Bytes(b) => b.len(),
        PieceData::Deferred(_) => CHUNK / 4,
    }
}

/// Content of one file at one offset.
struct Piece {
    file: Arc<PendingFile>,
    offset: u64,
    data: PieceData,
}

/// Small files travel together: one queue operation per batch rather than per file.
const BATCH_PIECES: usize = 64;

#[derive(Default)]
struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    written: AtomicU64,
    /// Whether zstd frames may be stored as they are (the target is btrfs, and it has not
    /// refused one).
    encoded: AtomicBool,
    xattr_failures: Mutex<Vec<(RelPath, XattrFailure)>>,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
}

/// An error for a failed write or metadata call on `path`.
pub fn write_error(path: &RelPath, what: &str, e: Errno) -> Error {
    let (code, hint) = match e {
        Errno::NOSPC => (Code::InsufficientSpace, " (the volume is full)"),
        Errno::DQUOT => (Code::QuotaExceeded, " (the volume's quota is exhausted)"),
        Errno::FBIG => (
            Code::Unsupported,
            " (the file is larger than the volume's filesystem holds: use a pool on btrfs or xfs)",
        ),
        _ => (Code::DriverError, ""),
    };
    Error::new(
        code,
        format!(
            "entry {}: {what}: {}{hint}",
            path.shown(),
            std::io::Error::from(e)
        ),
    )
    .with("entry", path.shown())
}

fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Writes `data` at `offset`, leaving aligned all-zero blocks as holes. The block that ends
/// the file is always written, so the file gets its size from the write itself (no
/// `ftruncate`) and every hole lies inside it.
fn write_sparse(file: &File, offset: u64, data: &[u8], ends_file: bool) -> std::io::Result<()> {
    let len = data.len();
    // The final block of the file may not be skipped.
    let skippable = |at: usize| {
        at + HOLE <= len && !(ends_file && at + HOLE >= len) && is_zero(&data[at..at + HOLE])
    };
    let mut start = 0;
    while start < len {
        while skippable(start) {
            start += HOLE;
        }
        if start >= len {
            break;
        }
        let mut end = start;
        loop {
            end = (end + HOLE).min(len);
            if end >= len || skippable(end) {
                break;
            }
        }
        file.write_all_at(&data[start..end], offset + start as u64)?;
        start = end;
    }
    Ok(())
}

/// Where a piece goes.
struct PieceAt<'a> {
    file: &'a PendingFile,
    offset: u64,
}

/// Stores a zstd frame as the file's content where the filesystem can (see [`encoded`]),
/// otherwise writes the bytes it decodes to.
fn store_or_write(
    shared: &Shared,
    piece: &PieceAt<'_>,
    data: &[u8],
    frame: &[u8],
    ends_file: bool,
) -> std::io::Result<()> {
    match encoded::store(&piece.file.file, piece.offset, frame, data.len())? {
        encoded::Outcome::Stored => Ok(()),
        encoded::Outcome::NotThisOne => {
            write_sparse(&piece.file.file, piece.offset, data, ends_file)
        }
        encoded::Outcome::NotHere => {
            shared.encoded.store(false, Ordering::Relaxed);
            write_sparse(&piece.file.file, piece.offset, data, ends_file)
        }
    }
}

fn finish_file(shared: &Shared, pending: &PendingFile) {
    match apply_meta_fd(
        std::os::fd::AsFd::as_fd(&pending.file),
        &pending.meta,
        Some(pending.born),
    ) {
        Ok(failures) if failures.is_empty() => {}
        Ok(failures) => {
            let mut all = shared
                .xattr_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.extend(failures.into_iter().map(|f| (pending.path.clone(), f)));
        }
        Err(e) => shared.fail(write_error(&pending.path, "set metadata", e)),
    }
}

fn worker(jobs: Receiver<Vec<Piece>>, recycle: Sender<Vec<u8>>, shared: Arc<Shared>) {
    for batch in jobs {
        for piece in batch {
            if shared.failed.load(Ordering::Relaxed) {
                continue;
            }
            let (data, frame) = match piece.data {
                PieceData::Bytes(bytes) => (bytes, None),
                PieceData::Deferred(produce) => match produce() {
                    Ok(produced) => (produced.bytes, produced.zstd_frame),
                    Err(e) => {
                        shared.fail(e.context(format!("entry {}", piece.file.path.shown())));
                        continue;
                    }
                },
            };
            let ends_file = piece.offset + data.len() as u64 == piece.file.size;
            let written = match frame {
                Some(frame) if shared.encoded.load(Ordering::Relaxed) => {
                    let at = PieceAt {
                        file: &piece.file,
                        offset: piece.offset,
                    };
                    store_or_write(&shared, &at, &data, &frame, ends_file)
                }
                _ => write_sparse(&piece.file.file, piece.offset, &data, ends_file),
            };
            match written {
                Ok(()) => {
                    shared
                        .written
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if piece.file.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        finish_file(&shared, &piece.file);
                    }
                }
                Err(e) => {
                    let errno = Errno::from_io_error(&e).unwrap_or(Errno::IO);
                    shared.fail(write_error(&piece.file.path, "write", errno));
                }
            }
            let mut data = data;
            if data.capacity() >= CHUNK {
                data.clear();
                let _ = recycle.try_send(data);
            }
        }
    }
}

/// The writer threads, their queue, and the batch being filled.
pub struct Writers {
    jobs: Option<Sender<Vec<Piece>>>,
    buffers: Receiver<Vec<u8>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    batch: Vec<Piece>,
    batch_bytes: usize,
}

/// How many writer threads to run: `REIMAGE_WRITERS` if set (for tuning), otherwise the
/// number of cores, at most 8. Writers both decompress (squashfs) and wait on the filesystem,
/// yet more writers than cores were no faster on 2 cores (a squashfs-zstd image volume
/// miss took the same 0.83–0.99 s with 2, 3 or 4 writers).
pub fn writer_count() -> usize {
    if let Some(n) = std::env::var("REIMAGE_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return usize::max(1, n);
    }
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
}

impl Writers {
    /// `encoded`: whether zstd frames may be stored as they are (see [`encoded`]).
    pub fn start(count: usize, encoded: bool) -> Result<Writers> {
        let (jobs, rx) = bounded::<Vec<Piece>>(JOBS_IN_FLIGHT);
        let (recycle, buffers) = bounded::<Vec<u8>>(JOBS_IN_FLIGHT + count);
        let shared = Arc::new(Shared {
            encoded: AtomicBool::new(encoded),
            ..Shared::default()
        });
        let mut writers = Writers {
            jobs: Some(jobs),
            buffers,
            threads: Vec::new(),
            shared,
            batch: Vec::new(),
            batch_bytes: 0,
        };
        for i in 0..count {
            let (rx, recycle, shared) = (rx.clone(), recycle.clone(), writers.shared.clone());
            let thread = std::thread::Builder::new()
                .name(format!("reimage-write{i}"))
                .spawn(move || worker(rx, recycle, shared))
                .map_err(|e| Error::internal(format!("cannot start a writer thread: {e}")))?;
            writers.threads.push(thread);
        }
        Ok(writers)
    }

    /// An empty buffer for `len` bytes of content: a recycled full-size one for whole chunks,
    /// an exact one for small files.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        if len >= CHUNK {
            self.buffers
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK))
        } else {
            Vec::with_capacity(len)
        }
    }

    /// `true` once a writer failed; the parser stops and [`Writers::finish`] says why.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Bytes of content written so far.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Queues `data` for `file` at `offset`; small pieces are batched, a batch is sent when
    /// it holds a chunk's worth of bytes or `BATCH_PIECES` pieces (waiting while the queue is
    /// full).
    pub fn submit(&mut self, file: Arc<PendingFile>, offset: u64, data: PieceData) -> Result<()> {
        self.batch_bytes += len_hint(&data);
        self.batch.push(Piece { file, offset, data });
        if self.batch_bytes >= CHUNK || self.batch.len() >= BATCH_PIECES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let sender = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::internal("writers already finished"))?;
        sender
            .send(batch)
            .map_err(|_| Error::internal("the writer threads stopped"))
    }

    /// Waits for every queued piece; returns the first failure, or the xattrs that could
    /// not be set.
    pub fn finish(mut self) -> Result<Vec<(RelPath, XattrFailure)>> {
        self.flush()?;
        self.jobs.take();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                return Err(Error::internal("a writer thread panicked"));
            }
        }
        if let Some(e) = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        let failures = std::mem::take(
            &mut *self
                .shared
                .xattr_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        Ok(failures)
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        // On an early return: queued pieces are skipped, the threads drain the queue and end.
        self.shared.failed.store(true, Ordering::SeqCst);
        self.batch.clear();
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_become_holes_and_content_is_exact() {
        let dir = std::env::temp_dir().join(format!("reimage-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = File::create(&path).unwrap();
        let mut data = vec![0u8; 5 * HOLE + 100];
        data[HOLE + 7] = 1;
        data[4 * HOLE..4 * HOLE + 3].copy_from_slice(b"abc");
        write_sparse(&file, 0, &data, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        // A file that ends in zeros still has its full size.
        let zeros = vec![0u8; 3 * HOLE];
        let file = File::create(&path).unwrap();
        write_sparse(&file, 0, &zeros, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), zeros);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
