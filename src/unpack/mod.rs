//! The unpacker: entries of an image become files inside one volume root.
//!
//! The image is hostile. Every entry is normalized ([`path`]), placed through the in-root
//! primitives of [`fs`], and a later entry with the same name replaces the earlier one without
//! writing through it. Directory metadata is deferred and applied deepest-first at the end, so
//! a read-only or root-owned directory cannot stop its own content from being written, and a
//! directory entry replaced by a symlink later never gets its mode applied through the link.

pub mod encoded;
pub mod fs;
pub mod idmap;
pub mod path;
pub mod pipeline;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::confine::{self, Reach};
use crate::error::{Code, Error, Result, Warning};
use crate::image::tar::{Entry, Kind};
use fs::{Born, Meta, RemoveError, Tree, XattrFailure};
use idmap::IdMap;
use path::{normalize, RelPath};
use pipeline::{PendingFile, Writers};

pub use crate::image::archive::{Archive, PieceData};

/// What the unpacker reports while it works, and how it learns that it should stop.
pub trait Observer {
    /// `done` bytes of file content written so far.
    fn progress(&mut self, done: u64);
    fn warning(&mut self, code: Warning, message: &str);
    /// `true` once the operation should stop (a signal arrived).
    fn cancelled(&self) -> bool;
}

/// How one image is unpacked.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only entries below this path are unpacked, with it as the volume root (the `rootfs/`
    /// of an LXD/Incus unified tarball).
    pub prefix: Option<RelPath>,
    pub idmap: IdMap,
    /// Paths already filled before unpacking (preserved content): image entries at or below
    /// them are skipped.
    pub skip: Vec<RelPath>,
    /// Content bytes the measure pass counted; writing more means the image changed.
    pub expected_bytes: Option<u64>,
    /// Whether an xattr the filesystem refuses fails the unpack or is a warning.
    pub unsupported_metadata: UnsupportedMetadata,
}

/// What to do with an image's metadata item (an ACL, a file capability, any xattr) that the
/// volume's filesystem refuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnsupportedMetadata {
    /// The request fails with `unsupported`, naming the path and the attribute (the default).
    #[default]
    Fail,
    /// The volume is built without it, with an `xattr_failed` warning per item.
    Warn,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

const SHOWN_XATTR_FAILURES: u64 = 5;

struct Unpacker<'a, 'o> {
    tree: Tree<'a>,
    writers: Option<Writers>,
    options: &'a Options,
    observer: &'o mut (dyn Observer + Send),
    deferred: HashMap<RelPath, Meta>,
    stats: Stats,
    xattr_failures: u64,
    since_progress: u64,
    /// This process's uid and gid, the owner of every file it creates here; `None` when the
    /// root is setgid (then directories below pass their group on to new files).
    process_owner: Option<(u32, u32)>,
    umask: u32,
}

/// Error for a failed filesystem call while placing `entry`.
fn fs_error(entry: &RelPath, what: &str, e: Errno) -> Error {
    let code = match e {
        Errno::NOSPC => Code::InsufficientSpace,
        Errno::DQUOT => Code::QuotaExceeded,
        Errno::NOTDIR | Errno::LOOP | Errno::NAMETOOLONG | Errno::MLINK | Errno::INVAL => {
            Code::ImageInvalid
        }
        Errno::XDEV => Code::UnsafeImage,
        Errno::FBIG => Code::Unsupported,
        _ => Code::DriverError,
    };
    let hint = match e {
        Errno::NOSPC => " (the volume is full)",
        Errno::DQUOT => " (the volume's quota is exhausted)",
        Errno::NOTDIR => " (a parent is not a directory)",
        Errno::FBIG => {
            " (the file is larger than the volume's filesystem holds: use a pool on btrfs or xfs)"
        }
        _ => "",
    };
    Error::new(
        code,
        format!(
            "entry {}: {what}: {}{hint}",
            entry.shown(),
            std::io::Error::from(e)
        ),
    )
    .with("entry", entry.shown())
}

/// An image's metadata item the volume's filesystem refused, as the request's error.
pub fn unsupported_metadata(path: &RelPath, failure: &XattrFailure) -> Error {
    Error::new(
        Code::Unsupported,
        format!(
            "cannot set {} on {}: {}; the volume's filesystem does not hold it. Fix the pool (for zfs: acltype=posixacl, xattr=sa) or send \"unsupported_metadata\": \"warn\" to build the volume without it",
            failure.name,
            path.shown(),
            std::io::Error::from(failure.errno)
        ),
    )
    .with("path", path.shown())
    .with("attribute", failure.name.clone())
}

fn unsafe_entry(entry: &RelPath, why: &str) -> Error {
    Error::new(Code::UnsafeImage, format!("entry {}: {why}", entry.shown()))
        .with("entry", entry.shown())
}

fn invalid_entry(entry: &RelPath, why: &str) -> Error {
    Error::new(
        Code::ImageInvalid,
        format!("entry {}: {why}", entry.shown()),
    )
    .with("entry", entry.shown())
}

/// The process's umask (read by setting it and setting it back, before any thread of ours
/// creates files).
fn current_umask() -> u32 {
    let old = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(old);
    old.bits()
}

/// Unpacks every entry of `archive` below `root`. On error the tree is left half-written: the
/// caller owns the volume and destroys it.
///
/// The work runs on a thread of its own that confines itself first ([`crate::confine`]:
/// seccomp, and Landlock beneath `root`); the writers it starts inherit that. The calling
/// thread stays as it was, and waits.
pub fn unpack(
    archive: &mut (dyn Archive + Send),
    root: BorrowedFd<'_>,
    options: &Options,
    observer: &mut (dyn Observer + Send),
) -> Result<Stats> {
    // Counted here: std reads the cgroup's CPU limits from /proc and /sys for it.
    let writers = pipeline::writer_count();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("reimage-unpack".into())
            .spawn_scoped(scope, move || {
                let (_, warning) = confine::this_thread(Reach::Beneath(root));
                if let Some(warning) = warning {
                    observer.warning(Warning::Unconfined, &warning);
                }
                if let Some(probe) = confine::forbidden_call_probe() {
                    return Err(Error::internal(probe));
                }
                unpack_confined(archive, root, options, observer, writers)
            })
            .map_err(|e| Error::internal(format!("cannot start the unpack thread: {e}")))?;
        thread
            .join()
            .unwrap_or_else(|_| Err(Error::internal("the unpack thread panicked")))
    })
}

/// [`unpack`]'s work, on its confined thread, with `writers` writer threads.
fn unpack_confined(
    archive: &mut (dyn Archive + Send),
    root: BorrowedFd<'_>,
    options: &Options,
    observer: &mut (dyn Observer + Send),
    writers: usize,
) -> Result<Stats> {
    let implicit_owner = (
        options.idmap.map(0).unwrap_or(0),
        options.idmap.map(0).unwrap_or(0),
    );
    if implicit_owner != (0, 0) {
        rustix::fs::fchown(
            root,
            Some(rustix::fs::Uid::from_raw(implicit_owner.0)),
            Some(rustix::fs::Gid::from_raw(implicit_owner.1)),
        )
        .map_err(|e| fs_error(&RelPath::root(), "chown", e))?;
    }
    let root_mode = rustix::fs::fstat(root)
        .map_err(|e| fs_error(&RelPath::root(), "stat", e))?
        .st_mode;
    let process_owner = (root_mode & 0o2000 == 0).then(|| {
        (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        )
    });
    let mut unpacker = Unpacker {
        tree: Tree::new(root, implicit_owner),
        writers: Some(Writers::start(writers, encoded::possible_under(root))?),
        options,
        observer,
        deferred: HashMap::new(),
        stats: Stats::default(),
        xattr_failures: 0,
        since_progress: 0,
        process_owner,
        umask: current_umask(),
    };
    while let Some(entry) = archive.next_entry()? {
        if unpacker.observer.cancelled() {
            return Err(Error::new(Code::Interrupted, "interrupted by a signal"));
        }
        if unpacker.writers()?.failed() {
            // finish() reports the writer's error.
            return unpacker.finish();
        }
        unpacker.entry(&entry, archive)?;
    }
    archive.finish()?;
    unpacker.finish()
}

impl Unpacker<'_, '_> {
    /// The path inside the volume for an archive path, or `None` when the entry lies outside
    /// the unpacked part (outside the rootfs prefix, or in a skipped path).
    fn place(&self, raw: &[u8]) -> Result<Option<RelPath>> {
        let path = normalize(raw)?;
        let path = match &self.options.prefix {
            Some(prefix) => match path.strip_prefix(prefix) {
                Some(p) => p,
                None => return Ok(None),
            },
            None => path,
        };
        if self.options.skip.iter().any(|s| path.is_within(s)) {
            return Ok(None);
        }
        Ok(Some(path))
    }

    fn meta(&self, entry: &Entry, path: &RelPath) -> Result<Meta> {
        let map = |id: u32, what: &str| {
            self.options.idmap.map(id).ok_or_else(|| {
                invalid_entry(path, &format!("{what} {id} is outside every idmap range"))
            })
        };
        let mut xattrs = Vec::with_capacity(entry.xattrs.len());
        let mut capability = None;
        for (name, value) in &entry.xattrs {
            let cname =
                fs::cstring(name).map_err(|_| invalid_entry(path, "an xattr name contains NUL"))?;
            let value = self.options.idmap.shift_xattr(name, value).map_err(|why| {
                invalid_entry(path, &format!("xattr {}: {why}", cname.to_string_lossy()))
            })?;
            // security.capability goes last: setting anything after it must not clear it.
            if name.as_slice() == b"security.capability" {
                capability = Some((cname, value));
            } else {
                xattrs.push((cname, value));
            }
        }
        xattrs.extend(capability);
        Ok(Meta {
            mode: entry.mode & 0o7777,
            uid: map(entry.uid, "uid")?,
            gid: map(entry.gid, "gid")?,
            mtime: entry.mtime,
            xattrs,
        })
    }

    /// Fails on the first xattr the filesystem refused, or (`unsupported_metadata: warn`)
    /// warns about it.
    fn report_xattr_failures(&mut self, path: &RelPath, failures: Vec<XattrFailure>) -> Result<()> {
        for f in failures {
            if self.options.unsupported_metadata == UnsupportedMetadata::Fail {
                return Err(unsupported_metadata(path, &f));
            }
            self.xattr_failures += 1;
            if self.xattr_failures <= SHOWN_XATTR_FAILURES {
                let message = format!(
                    "could not set xattr {} on {}: {}",
                    f.name,
                    path.shown(),
                    std::io::Error::from(f.errno)
                );
                self.observer.warning(Warning::XattrFailed, &message);
            }
        }
        Ok(())
    }

    fn remove_existing(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
    ) -> Result<()> {
        self.tree.remove(dir, name).map_err(|e| match e {
            RemoveError::Errno(e) => fs_error(path, "replacing the earlier entry", e),
            RemoveError::Tree(e) => Error::from(e).context(format!("entry {}", path.shown())),
        })
    }

    fn entry(&mut self, entry: &Entry, archive: &mut dyn Archive) -> Result<()> {
        let Some(path) = self.place(&entry.path)? else {
            return Ok(());
        };
        for note in &entry.notes {
            self.observer.warning(Warning::AclSkipped, note);
        }
        // Measure found these first where it ran first (and the plan refused or warned);
        // an unpack that measures as it goes stops at the first.
        if let (Some((attribute, what)), UnsupportedMetadata::Fail) =
            (entry.unholdable.first(), self.options.unsupported_metadata)
        {
            let item = crate::measure::Unholdable {
                path: path.shown(),
                attribute: attribute.clone(),
                what: what.clone(),
                count: 1,
            };
            return Err(item.refusal());
        }
        self.stats.entries += 1;
        let Some((parent_path, name)) = path.split_last() else {
            // The volume root: only a directory entry may describe it, and it keeps being a
            // directory whatever the image says.
            if entry.kind != Kind::Dir {
                return Err(unsafe_entry(
                    &path,
                    &format!("a {} cannot replace the volume root", entry.kind.as_str()),
                ));
            }
            let meta = self.meta(entry, &path)?;
            self.deferred.insert(path, meta);
            return Ok(());
        };
        let name = fs::cstring(name).map_err(|_| invalid_entry(&path, "NUL in name"))?;
        let parent = self
            .tree
            .dir(&parent_path)
            .map_err(|e| fs_error(&path, "opening its parent directory", e))?;
        let parent = parent.as_fd();
        match entry.kind {
            Kind::Dir => self.directory(parent, &name, &path, entry),
            Kind::File => self.file(parent, &name, &path, entry, archive),
            Kind::Symlink => self.symlink(parent, &name, &path, entry),
            Kind::Hardlink => self.hardlink(parent, &name, &path, entry),
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
                self.node(parent, &name, &path, entry)
            }
        }
    }

    fn directory(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
        entry: &Entry,
    ) -> Result<()> {
        let meta = self.meta(entry, path)?;
        match fs::kind_at(parent, name).map_err(|e| fs_error(path, "stat", e))? {
            Some((FileType::Directory, _)) => {}
            existing => {
                if existing.is_some() {
                    self.remove_existing(parent, name, path)?;
                }
                rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| fs_error(path, "mkdir", e))?;
            }
        }
        self.deferred.insert(path.clone(), meta);
        Ok(())
    }

    /// Creates `name` with `create`, replacing an earlier entry of that name once.
    fn create_replacing<T>(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
        what: &str,
        mut create: impl FnMut() -> rustix::io::Result<T>,
    ) -> Result<T> {
        match create() {
            Ok(v) => Ok(v),
            Err(Errno::EXIST) => {
                self.remove_existing(parent, name, path)?;
                create().map_err(|e| fs_error(path, what, e))
            }
            Err(e) => Err(fs_error(path, what, e)),
        }
    }

    fn writers_mut(&mut self) -> Result<&mut Writers> {
        self.writers
            .as_mut()
            .ok_or_else(|| Error::internal("the writers are already finished"))
    }

    fn writers(&self) -> Result<&Writers> {
        self.writers
            .as_ref()
            .ok_or_else(|| Error::internal("the writers are already finished"))
    }

    /// Creates the file in archive order, then hands its content to the writers in chunks;
    /// the writer that completes it sets its metadata.
    fn file(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
        entry: &Entry,
        archive: &mut dyn Archive,
    ) -> Result<()> {
        let meta = self.meta(entry, path)?;
        // Created with its final permission bits where the umask leaves them alone, and owned
        // by this process: the writer then skips the chmod and chown it does not need.
        let born = Born {
            owner: self.process_owner,
            mode: meta.mode & 0o777 & !self.umask,
        };
        let fd: OwnedFd = self.create_replacing(parent, name, path, "create", || {
            rustix::fs::openat(
                parent,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(meta.mode & 0o777),
            )
        })?;
        let file = std::fs::File::from(fd);
        let size = entry.size;
        if size == 0 {
            let failures = fs::apply_meta_fd(file.as_fd(), &meta, Some(born))
                .map_err(|e| fs_error(path, "set metadata", e))?;
            self.report_xattr_failures(path, failures)?;
            return Ok(());
        }
        let data_size = entry.data_size();
        if let Some(expected) = self.options.expected_bytes {
            if self.stats.bytes + data_size > expected {
                return Err(Error::new(
                    Code::ImageInvalid,
                    "the image holds more data than when it was measured (was it changed?)",
                ));
            }
        }
        // The pieces to write: for a sparse file only its data segments (the file is sized
        // first and the rest stays holes), for any other file the whole of it.
        let piece_size = archive.piece_size() as u64;
        let whole = [(0, size)];
        let segments: &[(u64, u64)] = match &entry.sparse {
            Some(map) => {
                file.set_len(size).map_err(|e| {
                    fs_error(
                        path,
                        "set size",
                        Errno::from_io_error(&e).unwrap_or(Errno::IO),
                    )
                })?;
                map
            }
            None => &whole,
        };
        let pieces: u64 = segments
            .iter()
            .map(|&(_, len)| len.div_ceil(piece_size))
            .sum();
        if pieces == 0 {
            let failures = fs::apply_meta_fd(file.as_fd(), &meta, Some(born))
                .map_err(|e| fs_error(path, "set metadata", e))?;
            self.report_xattr_failures(path, failures)?;
            return Ok(());
        }
        let pending = Arc::new(PendingFile {
            file,
            meta,
            born,
            path: path.clone(),
            size,
            remaining: AtomicUsize::new(pieces as usize),
        });
        for &(start, len) in segments {
            let mut done = 0u64;
            while done < len {
                let writers = self.writers()?;
                if writers.failed() {
                    return Ok(());
                }
                let want = (len - done).min(piece_size) as usize;
                let buf = archive
                    .piece(start + done, want, writers.buffer(want))
                    .map_err(|e| e.context(format!("entry {}", path.shown())))?;
                self.writers_mut()?
                    .submit(pending.clone(), start + done, buf)?;
                done += want as u64;
                self.stats.bytes += want as u64;
                self.since_progress += want as u64;
                if self.since_progress >= 1 << 20 {
                    self.since_progress = 0;
                    let written = self.writers()?.written();
                    self.observer.progress(written);
                    if self.observer.cancelled() {
                        return Err(Error::new(Code::Interrupted, "interrupted by a signal"));
                    }
                }
            }
        }
        Ok(())
    }

    fn symlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
        entry: &Entry,
    ) -> Result<()> {
        let meta = self.meta(entry, path)?;
        if entry.link.is_empty() || entry.link.contains(&0) {
            return Err(invalid_entry(
                path,
                "a symlink needs a target without NUL bytes",
            ));
        }
        let target =
            fs::cstring(&entry.link).map_err(|_| invalid_entry(path, "NUL in link target"))?;
        // The target is stored as text; it is never followed while unpacking (every lookup
        // resolves in-root), so an absolute or `..` target cannot lead out.
        self.create_replacing(parent, name, path, "symlink", || {
            rustix::fs::symlinkat(&target, parent, name)
        })?;
        let failures = fs::apply_meta_at(parent, name, &meta, true)
            .map_err(|e| fs_error(path, "set metadata", e))?;
        self.report_xattr_failures(path, failures)?;
        Ok(())
    }

    fn hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
        entry: &Entry,
    ) -> Result<()> {
        let target = match self.place(&entry.link)? {
            Some(t) if !t.is_root() => t,
            Some(_) => return Err(unsafe_entry(path, "a hardlink to the volume root")),
            None => {
                return Err(unsafe_entry(
                    path,
                    &format!(
                        "hardlink target {:?} lies outside the unpacked tree",
                        crate::image::tar::shown(&entry.link)
                    ),
                ))
            }
        };
        let target_fd = fs::open_link_target(self.tree.root(), &target).map_err(|e| match e {
            Errno::NOENT => invalid_entry(
                path,
                &format!(
                    "hardlink target {} does not exist (it must come earlier in the image)",
                    target.shown()
                ),
            ),
            e => fs_error(path, "opening the hardlink target", e),
        })?;
        let target_stat =
            rustix::fs::fstat(&target_fd).map_err(|e| fs_error(path, "stat hardlink target", e))?;
        if FileType::from_raw_mode(target_stat.st_mode) == FileType::Directory {
            return Err(unsafe_entry(
                path,
                &format!("hardlink to the directory {}", target.shown()),
            ));
        }
        if let Some((_, st)) = fs::kind_at(parent, name).map_err(|e| fs_error(path, "stat", e))? {
            if (st.st_dev, st.st_ino) == (target_stat.st_dev, target_stat.st_ino) {
                return Ok(());
            }
        }
        self.create_replacing(parent, name, path, "link", || {
            rustix::fs::linkat(&target_fd, c"", parent, name, AtFlags::EMPTY_PATH)
        })
    }

    fn node(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CString,
        path: &RelPath,
        entry: &Entry,
    ) -> Result<()> {
        let meta = self.meta(entry, path)?;
        let (kind, dev) = match entry.kind {
            Kind::CharDevice => (
                FileType::CharacterDevice,
                rustix::fs::makedev(entry.dev_major, entry.dev_minor),
            ),
            Kind::BlockDevice => (
                FileType::BlockDevice,
                rustix::fs::makedev(entry.dev_major, entry.dev_minor),
            ),
            _ => (FileType::Fifo, 0),
        };
        self.create_replacing(parent, name, path, "mknod", || {
            rustix::fs::mknodat(parent, name, kind, Mode::from_raw_mode(0o600), dev)
        })?;
        let failures = fs::apply_meta_at(parent, name, &meta, false)
            .map_err(|e| fs_error(path, "set metadata", e))?;
        self.report_xattr_failures(path, failures)?;
        Ok(())
    }

    /// Applies directory metadata deepest first, then reports what could not be set.
    fn finish(mut self) -> Result<Stats> {
        let writers = self
            .writers
            .take()
            .ok_or_else(|| Error::internal("the writers are already finished"))?;
        for (path, failure) in writers.finish()? {
            self.report_xattr_failures(&path, vec![failure])?;
        }
        let mut dirs: Vec<(RelPath, Meta)> =
            std::mem::take(&mut self.deferred).into_iter().collect();
        dirs.sort_by(|a, b| b.0.depth().cmp(&a.0.depth()).then_with(|| a.0.cmp(&b.0)));
        for (path, meta) in dirs {
            let Some(fd) = fs::open_dir_for_meta(self.tree.root(), &path)
                .map_err(|e| fs_error(&path, "open", e))?
            else {
                continue;
            };
            let failures = fs::apply_meta_fd(fd.as_fd(), &meta, None)
                .map_err(|e| fs_error(&path, "set metadata", e))?;
            self.report_xattr_failures(&path, failures)?;
        }
        if self.xattr_failures > SHOWN_XATTR_FAILURES {
            let message = format!(
                "{} more xattrs could not be set (does the filesystem support them?)",
                self.xattr_failures - SHOWN_XATTR_FAILURES
            );
            self.observer.warning(Warning::XattrFailed, &message);
        }
        self.observer.progress(self.stats.bytes);
        Ok(self.stats)
    }
}
