//! The filesystem side of unpacking, confined to one volume root.
//!
//! Rules kept here, for every entry of every image:
//! - directories are reached with `openat2(root, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
//!   | RESOLVE_NO_XDEV)`: an absolute symlink such as `/bin -> usr/bin` resolves inside the
//!   volume, and `..` can never climb above its root;
//! - the final component is never followed: files are created `O_CREAT | O_EXCL | O_NOFOLLOW`,
//!   links and nodes with `symlinkat`, `linkat` (no `AT_SYMLINK_FOLLOW`), `mknodat`;
//! - an existing entry is replaced by unlinking it (never by writing through it);
//! - metadata goes through the new object's own fd where one exists, in the safe order: owner
//!   (which clears setuid and capabilities), mode, xattrs, times.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use super::path::RelPath;

pub const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Metadata to give one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    /// Already shifted by the idmap; applied in order, `security.capability` last.
    pub xattrs: Vec<(CString, Vec<u8>)>,
}

/// A failed xattr, for the caller to report (a filesystem without xattr support should not
/// stop a rootfs from being unpacked).
pub struct XattrFailure {
    pub name: String,
    pub errno: Errno,
}

pub fn cstring(bytes: &[u8]) -> Result<CString, Errno> {
    CString::new(bytes).map_err(|_| Errno::INVAL)
}

fn times(mtime: (i64, u32)) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.0,
        tv_nsec: mtime.1 as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn set_xattrs(
    meta: &Meta,
    mut set: impl FnMut(&CStr, &[u8]) -> rustix::io::Result<()>,
) -> Result<Vec<XattrFailure>, Errno> {
    let mut failures = Vec::new();
    for (name, value) in &meta.xattrs {
        match set(name, value) {
            Ok(()) => {}
            Err(e @ (Errno::NOSPC | Errno::DQUOT)) => return Err(e),
            Err(errno) => failures.push(XattrFailure {
                name: name.to_string_lossy().into_owned(),
                errno,
            }),
        }
    }
    Ok(failures)
}

/// What a freshly created object is known to have: the owner and permission bits the kernel
/// gave it. Metadata calls that would set what is already there are skipped (on btrfs each
/// costs about as much as creating the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Born {
    /// `None` when the owner cannot be known (a setgid directory passes its group on).
    pub owner: Option<(u32, u32)>,
    pub mode: u32,
}

/// Owner, mode, xattrs and times through an fd opened for reading or writing. With `born`,
/// owner and mode are only set where they differ from it; chown still comes before chmod
/// (chown clears setuid and setgid), and `born` never has those bits.
pub fn apply_meta_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    born: Option<Born>,
) -> Result<Vec<XattrFailure>, Errno> {
    if born.is_none_or(|b| b.owner != Some((meta.uid, meta.gid))) {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
        )?;
    }
    if born.is_none_or(|b| b.mode != meta.mode) {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    }
    let failures = set_xattrs(meta, |n, v| {
        rustix::fs::fsetxattr(fd, n, v, XattrFlags::empty())
    })?;
    rustix::fs::futimens(fd, &times(meta.mtime))?;
    Ok(failures)
}

/// Metadata of a symlink, device node or fifo that was just created as `name` in `dir`
/// (these cannot be opened for metadata without following or blocking).
pub fn apply_meta_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    meta: &Meta,
    is_symlink: bool,
) -> Result<Vec<XattrFailure>, Errno> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if !is_symlink {
        // The name was created by mknodat just now in a tree only this process writes.
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())?;
    }
    let failures = if meta.xattrs.is_empty() {
        Vec::new()
    } else {
        // lsetxattr through our own directory fd's magic link: the link resolves to `dir`
        // itself and the final name is not followed.
        let mut via = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        via.extend_from_slice(name.to_bytes());
        let via = cstring(&via)?;
        set_xattrs(meta, |n, v| {
            rustix::fs::lsetxattr(&via, n, v, XattrFlags::empty())
        })?
    };
    rustix::fs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(failures)
}

/// Directory handles inside one volume root, with a cache of the last parent used (archives
/// list entries directory by directory, so most lookups hit it).
pub struct Tree<'r> {
    root: BorrowedFd<'r>,
    cached: Option<(RelPath, Arc<OwnedFd>)>,
    /// Owner for directories that the archive implies but does not list.
    implicit_owner: (u32, u32),
}

impl<'r> Tree<'r> {
    pub fn new(root: BorrowedFd<'r>, implicit_owner: (u32, u32)) -> Self {
        Tree {
            root,
            cached: None,
            implicit_owner,
        }
    }

    pub fn root(&self) -> BorrowedFd<'r> {
        self.root
    }

    /// Forgets cached handles; called whenever a directory is removed or replaced.
    pub fn invalidate(&mut self) {
        self.cached = None;
    }

    /// Opens directory `path` (resolved in-root) as an `O_PATH` handle.
    fn open_dir(&self, path: &RelPath) -> Result<OwnedFd, Errno> {
        let target: &[u8] = if path.is_root() {
            b"."
        } else {
            path.as_bytes()
        };
        rustix::fs::openat2(
            self.root,
            cstring(target)?.as_c_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
    }

    /// The directory `path`, creating missing components (mode 0755, the implicit owner).
    /// A component that exists but is not a directory (or a symlink that resolves to none)
    /// is `ENOTDIR`.
    pub fn dir(&mut self, path: &RelPath) -> Result<Arc<OwnedFd>, Errno> {
        if let Some((cached_path, fd)) = &self.cached {
            if cached_path == path {
                return Ok(fd.clone());
            }
        }
        let fd = match self.open_dir(path) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => self.make_dirs(path)?,
            Err(e) => return Err(e),
        };
        let fd = Arc::new(fd);
        self.cached = Some((path.clone(), fd.clone()));
        Ok(fd)
    }

    fn make_dirs(&mut self, path: &RelPath) -> Result<OwnedFd, Errno> {
        let mut current = self.open_dir(&RelPath::root())?;
        let mut so_far = RelPath::root();
        for component in path.components() {
            so_far = so_far.join(component);
            match self.open_dir(&so_far) {
                Ok(fd) => current = fd,
                Err(Errno::NOENT) => {
                    let name = cstring(component)?;
                    match rustix::fs::mkdirat(&current, &name, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            let fd = rustix::fs::openat(
                                &current,
                                &name,
                                OFlags::RDONLY
                                    | OFlags::DIRECTORY
                                    | OFlags::NOFOLLOW
                                    | OFlags::CLOEXEC,
                                Mode::empty(),
                            )?;
                            let (uid, gid) = self.implicit_owner;
                            if (uid, gid) != (0, 0) {
                                rustix::fs::fchown(
                                    &fd,
                                    Some(rustix::fs::Uid::from_raw(uid)),
                                    Some(rustix::fs::Gid::from_raw(gid)),
                                )?;
                            }
                            current = fd;
                        }
                        // Something is there but does not resolve to a directory (a
                        // dangling symlink): the entry cannot be placed.
                        Err(Errno::EXIST) => return Err(Errno::NOTDIR),
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(current)
    }

    /// Removes whatever is at `name` in `dir` (a whole tree for a directory). Never follows
    /// a symlink: the link itself is removed.
    pub fn remove(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), RemoveError> {
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(RemoveError::Errno(e)),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            self.invalidate();
            reimage_driver::tree::remove_tree(dir, name, &name.to_string_lossy())
                .map_err(RemoveError::Tree)
        } else {
            rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(RemoveError::Errno)
        }
    }
}

pub enum RemoveError {
    Errno(Errno),
    Tree(reimage_driver::Error),
}

/// What is at `name` in `dir`, without following it.
pub fn kind_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
) -> Result<Option<(FileType, rustix::fs::Stat)>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((FileType::from_raw_mode(st.st_mode), st))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens a hardlink target inside the root without following its final component.
pub fn open_link_target(root: BorrowedFd<'_>, target: &RelPath) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        root,
        cstring(target.as_bytes())?.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )
}

/// Opens a directory inside the root for its deferred metadata; `None` if the path is no
/// longer a directory (a later entry replaced it).
pub fn open_dir_for_meta(root: BorrowedFd<'_>, path: &RelPath) -> Result<Option<OwnedFd>, Errno> {
    let target: &[u8] = if path.is_root() {
        b"."
    } else {
        path.as_bytes()
    };
    match rustix::fs::openat2(
        root,
        cstring(target)?.as_c_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Ok(None),
        Err(e) => Err(e),
    }
}
