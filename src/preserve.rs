//! `preserve`: copying listed paths from the old volume into the new one before the swap.
//!
//! The old volume was written by its container and is as untrusted as an image: paths are
//! resolved in-root in both volumes, nothing is ever followed (a symlink is copied as a
//! symlink), copies never cross into another mount, and owners, modes, times, xattrs and
//! hardlinks inside a copied tree are kept.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use reimage_driver::walk::{open_dir, DirStack};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Code, Error, Result};
use crate::unpack::fs::{apply_meta_at, apply_meta_fd, cstring, Meta, Tree, XattrFailure, RESOLVE};
use crate::unpack::path::RelPath;

/// What a copy is for: that decides how it writes a file's data, and what its error
/// messages say it was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// `preserve`: files read and written (the old volume may be on any filesystem).
    Preserve,
    /// A dir pool's image volume copied into a volume: every file a reflink of the image
    /// volume's blocks (`FICLONE`), on one filesystem that has them.
    ImageVolume,
}

impl Purpose {
    fn fail(self, path: &RelPath, what: &str, e: Errno) -> Error {
        let code = match e {
            Errno::NOSPC => Code::InsufficientSpace,
            Errno::DQUOT => Code::QuotaExceeded,
            _ => Code::DriverError,
        };
        Error::new(
            code,
            format!(
                "{} {}: {what}: {}",
                self.doing(),
                path.shown(),
                std::io::Error::from(e)
            ),
        )
    }

    fn doing(self) -> &'static str {
        match self {
            Purpose::Preserve => "preserving",
            Purpose::ImageVolume => "copying the image volume at",
        }
    }
}

/// xattrs of an object: through its fd, or through `/proc/self/fd/DIR/NAME` without following.
fn xattrs(
    fd: Option<BorrowedFd<'_>>,
    dir: BorrowedFd<'_>,
    name: &CStr,
) -> std::result::Result<Vec<(CString, Vec<u8>)>, Errno> {
    let via = || -> std::result::Result<CString, Errno> {
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name.to_bytes());
        cstring(&p)
    };
    let mut names = vec![0u8; 64 * 1024];
    let n = match fd {
        Some(fd) => rustix::fs::flistxattr(fd, &mut names[..]),
        None => rustix::fs::llistxattr(&via()?, &mut names[..]),
    };
    let n = match n {
        Ok(n) => n,
        Err(Errno::NOTSUP) => 0,
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for attr in names[..n].split(|&b| b == 0).filter(|a| !a.is_empty()) {
        let attr = cstring(attr)?;
        let mut value = vec![0u8; 64 * 1024];
        let len = match fd {
            Some(fd) => rustix::fs::fgetxattr(fd, &attr, &mut value[..]),
            None => rustix::fs::lgetxattr(&via()?, &attr, &mut value[..]),
        };
        match len {
            Ok(len) => {
                value.truncate(len);
                out.push((attr, value));
            }
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e),
        }
    }
    // security.capability last, as when unpacking.
    out.sort_by_key(|(n, _)| n.as_bytes() == b"security.capability");
    Ok(out)
}

fn meta_of(st: &Stat, xattrs: Vec<(CString, Vec<u8>)>) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        xattrs,
    }
}

/// Below this depth, error messages name a copied entry by the preserved path, `…` and its
/// own name: a full path per level would cost memory quadratic in the depth.
const SHOWN_DEPTH: usize = 64;

/// What to do with an xattr the new volume's filesystem refused: fail, or go on.
pub type OnRefused<'a> = &'a mut dyn FnMut(&RelPath, &XattrFailure) -> Result<()>;

struct Copier<'a> {
    /// (dev, ino) of a copied file with several links → its fd in the new volume, for linkat.
    links: HashMap<(u64, u64), OwnedFd>,
    bytes: u64,
    dev: u64,
    refused: OnRefused<'a>,
    purpose: Purpose,
}

/// A directory copied but not finished: its listing is still being copied, and its own
/// metadata (times last) is applied when that is done.
struct OpenDir {
    meta: Meta,
    shown: RelPath,
}

impl Copier<'_> {
    fn report(&mut self, shown: &RelPath, failures: Vec<XattrFailure>) -> Result<()> {
        for f in &failures {
            (self.refused)(shown, f)?;
        }
        Ok(())
    }

    /// Copies `name` in `src_dir` to `name` in `dst_dir` (which must not exist), with
    /// everything below it. The walk holds a bounded number of directories open in each
    /// volume ([`reimage_driver::walk::DirStack`]), whatever the depth.
    fn copy(
        &mut self,
        src_dir: BorrowedFd<'_>,
        dst_dir: BorrowedFd<'_>,
        name: &CStr,
        shown: &RelPath,
    ) -> Result<()> {
        let purpose = self.purpose;
        let Some((src_fd, dst_fd, meta)) = self.copy_entry(src_dir, dst_dir, name, shown)? else {
            return Ok(());
        };
        let walk_fail = |e: Errno| purpose.fail(shown, "walk", e);
        let mut src = DirStack::new(src_fd).map_err(walk_fail)?;
        let mut dst = DirStack::new(dst_fd).map_err(walk_fail)?;
        let mut open = vec![OpenDir {
            meta,
            shown: shown.clone(),
        }];
        loop {
            match src.next_entry() {
                Some(entry) => {
                    let child = entry.map_err(walk_fail)?.name;
                    let parent_shown = open.last().map_or(shown, |o| &o.shown);
                    let child_shown = if open.len() < SHOWN_DEPTH {
                        parent_shown.join(child.to_bytes())
                    } else {
                        shown.join(b"\xe2\x80\xa6").join(child.to_bytes())
                    };
                    let entered = self.copy_entry(
                        src.fd().map_err(walk_fail)?,
                        dst.fd().map_err(walk_fail)?,
                        &child,
                        &child_shown,
                    )?;
                    if let Some((s, d, meta)) = entered {
                        src.push(s, &child).map_err(walk_fail)?;
                        dst.push(d, &child).map_err(walk_fail)?;
                        open.push(OpenDir {
                            meta,
                            shown: child_shown,
                        });
                    }
                }
                None => {
                    let Some(done) = open.pop() else { break };
                    let refused = apply_meta_fd(dst.fd().map_err(walk_fail)?, &done.meta, None)
                        .map_err(|e| purpose.fail(&done.shown, "set metadata", e))?;
                    self.report(&done.shown, refused)?;
                    src.pop().map_err(walk_fail)?;
                    if dst.pop().map_err(walk_fail)?.is_none() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies one entry. For a directory, creates it empty and returns the open source and
    /// copy and the source's metadata, for [`Copier::copy`] to fill and finish.
    fn copy_entry(
        &mut self,
        src_dir: BorrowedFd<'_>,
        dst_dir: BorrowedFd<'_>,
        name: &CStr,
        shown: &RelPath,
    ) -> Result<Option<(OwnedFd, OwnedFd, Meta)>> {
        let purpose = self.purpose;
        let st = rustix::fs::statat(src_dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| purpose.fail(shown, "stat", e))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::Directory && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&(st.st_dev as u64, st.st_ino as u64)) {
                rustix::fs::linkat(first, c"", dst_dir, name, AtFlags::EMPTY_PATH)
                    .map_err(|e| purpose.fail(shown, "link", e))?;
                return Ok(None);
            }
        }
        match kind {
            FileType::Directory => {
                if st.st_dev as u64 != self.dev {
                    return Err(Error::new(
                        Code::VolumeBusy,
                        format!(
                            "{} {}: a filesystem is mounted there",
                            purpose.doing(),
                            shown.shown()
                        ),
                    ));
                }
                let src = open_dir(src_dir, name).map_err(|e| purpose.fail(shown, "open", e))?;
                rustix::fs::mkdirat(dst_dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| purpose.fail(shown, "mkdir", e))?;
                let dst = open_dir(dst_dir, name).map_err(|e| purpose.fail(shown, "open", e))?;
                let meta = meta_of(
                    &st,
                    xattrs(Some(src.as_fd()), src_dir, name)
                        .map_err(|e| purpose.fail(shown, "xattrs", e))?,
                );
                return Ok(Some((src, dst, meta)));
            }
            FileType::RegularFile => {
                let src = rustix::fs::openat(
                    src_dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| purpose.fail(shown, "open", e))?;
                let dst = rustix::fs::openat(
                    dst_dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| purpose.fail(shown, "create", e))?;
                let mut from = std::fs::File::from(src);
                let mut to = std::fs::File::from(dst);
                self.bytes += match purpose {
                    Purpose::Preserve => std::io::copy(&mut from, &mut to).map_err(|e| {
                        purpose.fail(shown, "copy", Errno::from_io_error(&e).unwrap_or(Errno::IO))
                    })?,
                    Purpose::ImageVolume => {
                        rustix::fs::ioctl_ficlone(&to, &from)
                            .map_err(|e| purpose.fail(shown, "reflink", e))?;
                        st.st_size as u64
                    }
                };
                let meta = meta_of(
                    &st,
                    xattrs(Some(from.as_fd()), src_dir, name)
                        .map_err(|e| purpose.fail(shown, "xattrs", e))?,
                );
                let refused = apply_meta_fd(to.as_fd(), &meta, None)
                    .map_err(|e| purpose.fail(shown, "set metadata", e))?;
                self.report(shown, refused)?;
                if st.st_nlink > 1 {
                    let keep = rustix::fs::openat(
                        dst_dir,
                        name,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| purpose.fail(shown, "open", e))?;
                    self.links
                        .insert((st.st_dev as u64, st.st_ino as u64), keep);
                }
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(src_dir, name, Vec::new())
                    .map_err(|e| purpose.fail(shown, "readlink", e))?;
                rustix::fs::symlinkat(&target, dst_dir, name)
                    .map_err(|e| purpose.fail(shown, "symlink", e))?;
                let meta = meta_of(
                    &st,
                    xattrs(None, src_dir, name).map_err(|e| purpose.fail(shown, "xattrs", e))?,
                );
                let refused = apply_meta_at(dst_dir, name, &meta, true)
                    .map_err(|e| purpose.fail(shown, "set metadata", e))?;
                self.report(shown, refused)?;
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                rustix::fs::mknodat(dst_dir, name, kind, Mode::from_raw_mode(0o600), st.st_rdev)
                    .map_err(|e| purpose.fail(shown, "mknod", e))?;
                let meta = meta_of(
                    &st,
                    xattrs(None, src_dir, name).map_err(|e| purpose.fail(shown, "xattrs", e))?,
                );
                let refused = apply_meta_at(dst_dir, name, &meta, false)
                    .map_err(|e| purpose.fail(shown, "set metadata", e))?;
                self.report(shown, refused)?;
            }
            // Sockets belong to running programs; there is nothing to keep.
            _ => {}
        }
        Ok(None)
    }
}

/// Copies each of `paths` from `old_root` to `new_root`, replacing what the image put there.
/// Paths missing from the old volume are reported through `missing` and skipped. Returns the
/// bytes copied.
pub fn preserve(
    old_root: BorrowedFd<'_>,
    new_root: BorrowedFd<'_>,
    paths: &[RelPath],
    missing: &mut dyn FnMut(&RelPath),
    refused: OnRefused<'_>,
) -> Result<u64> {
    let dev = rustix::fs::fstat(old_root)
        .map_err(|e| Purpose::Preserve.fail(&RelPath::root(), "stat", e))?
        .st_dev as u64;
    let mut copier = Copier {
        links: HashMap::new(),
        bytes: 0,
        dev,
        refused,
        purpose: Purpose::Preserve,
    };
    let mut new_tree = Tree::new(new_root, (0, 0));
    for path in paths {
        let Some((parent, name)) = path.split_last() else {
            continue;
        };
        let parent_bytes: &[u8] = if parent.is_root() {
            b"."
        } else {
            parent.as_bytes()
        };
        let src_parent = match rustix::fs::openat2(
            old_root,
            cstring(parent_bytes)
                .map_err(|e| Purpose::Preserve.fail(path, "path", e))?
                .as_c_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => {
                missing(path);
                continue;
            }
            Err(e) => return Err(Purpose::Preserve.fail(path, "open in the old volume", e)),
        };
        let name = cstring(name).map_err(|e| Purpose::Preserve.fail(path, "path", e))?;
        if let Err(Errno::NOENT) = rustix::fs::statat(&src_parent, &name, AtFlags::SYMLINK_NOFOLLOW)
        {
            missing(path);
            continue;
        }
        let dst_parent = new_tree
            .dir(&parent)
            .map_err(|e| Purpose::Preserve.fail(path, "open in the new volume", e))?;
        new_tree
            .remove(dst_parent.as_fd(), &name)
            .map_err(|e| match e {
                crate::unpack::fs::RemoveError::Errno(e) => {
                    Purpose::Preserve.fail(path, "replace", e)
                }
                crate::unpack::fs::RemoveError::Tree(e) => Error::from(e),
            })?;
        copier.copy(src_parent.as_fd(), dst_parent.as_fd(), &name, path)?;
    }
    Ok(copier.bytes)
}

/// Copies everything in the directory `src_root` into the empty directory `dst_root`, every
/// file a reflink of the source's (both on one filesystem that has reflinks), hardlinks,
/// owners, modes, xattrs and times kept; then gives `dst_root` the metadata of `src_root`.
/// Nothing is followed, and a mount below `src_root` is an error. Returns the bytes the
/// files hold.
pub fn reflink_tree(src_root: BorrowedFd<'_>, dst_root: BorrowedFd<'_>) -> Result<u64> {
    let purpose = Purpose::ImageVolume;
    let root = RelPath::root();
    let st = rustix::fs::fstat(src_root).map_err(|e| purpose.fail(&root, "stat", e))?;
    let mut refused = |path: &RelPath, failure: &XattrFailure| {
        Err(crate::unpack::unsupported_metadata(path, failure))
    };
    let mut copier = Copier {
        links: HashMap::new(),
        bytes: 0,
        dev: st.st_dev as u64,
        refused: &mut refused,
        purpose,
    };
    let mut names = Vec::new();
    let listing =
        rustix::fs::Dir::read_from(src_root).map_err(|e| purpose.fail(&root, "list", e))?;
    for entry in listing {
        let entry = entry.map_err(|e| purpose.fail(&root, "list", e))?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    for name in names {
        copier.copy(src_root, dst_root, &name, &root.join(name.to_bytes()))?;
    }
    let meta = meta_of(
        &st,
        xattrs(Some(src_root), src_root, c".").map_err(|e| purpose.fail(&root, "xattrs", e))?,
    );
    let refused =
        apply_meta_fd(dst_root, &meta, None).map_err(|e| purpose.fail(&root, "set metadata", e))?;
    copier.report(&root, refused)?;
    Ok(copier.bytes)
}
