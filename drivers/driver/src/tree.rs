//! fd-relative operations on whole directory trees: removal and usage accounting.
//!
//! Both walk with an explicit, bounded stack ([`DirStack`]: a hostile tree may be
//! deeper than any thread stack or open-file limit), open every directory with `O_NOFOLLOW` relative to its parent's fd (a symlink is never
//! followed), and refuse to cross into another mount: removing a tree must never reach into
//! a filesystem that somebody mounted inside it.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::os::fd::BorrowedFd;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, StatxFlags};

use crate::walk::{open_dir as open_subdir, DirStack};
use rustix::io::Errno;

use crate::{Error, ErrorKind, Result};

fn mount_id(dirfd: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<u64> {
    let st = rustix::fs::statx(
        dirfd,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::EMPTY_PATH,
        StatxFlags::MNT_ID,
    )?;
    Ok(st.stx_mnt_id)
}

const FS_IMMUTABLE_FL: u32 = 0x10;
const FS_APPEND_FL: u32 = 0x20;

/// Clears the immutable and append-only flags of `name` (a directory or regular file only:
/// opening a device node or fifo can have side effects). Returns whether anything changed.
fn clear_protection_flags(dirfd: BorrowedFd<'_>, name: &CStr) -> bool {
    let Ok(st) = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return false;
    };
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::Directory && kind != FileType::RegularFile {
        return false;
    }
    let Ok(fd) = rustix::fs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let Ok(flags) = rustix::fs::ioctl_getflags(&fd) else {
        return false;
    };
    let bits = flags.bits();
    if bits & (FS_IMMUTABLE_FL | FS_APPEND_FL) == 0 {
        return false;
    }
    let cleared = rustix::fs::IFlags::from_bits_retain(bits & !(FS_IMMUTABLE_FL | FS_APPEND_FL));
    rustix::fs::ioctl_setflags(&fd, cleared).is_ok()
}

/// Unlinks one non-directory or empty directory, clearing immutable/append-only flags on the
/// entry and on its directory once when the kernel says EPERM.
fn unlink_entry(dirfd: BorrowedFd<'_>, name: &CStr, flags: AtFlags) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(dirfd, name, flags) {
        Err(Errno::PERM) => {
            let changed_entry = clear_protection_flags(dirfd, name);
            let changed_dir = clear_protection_flags(dirfd, c".");
            if changed_entry || changed_dir {
                rustix::fs::unlinkat(dirfd, name, flags)
            } else {
                Err(Errno::PERM)
            }
        }
        other => other,
    }
}

/// Names of a directory's non-directories whose unlink is deferred, at most this many.
const PENDING: usize = 1024;
/// Files at least this large (allocated) are unlinked on two threads.
const LARGE: u64 = 256 << 10;

/// Unlinks `names` in `dirfd`, the large files on two threads: the final unlink of a file
/// frees its page cache, which takes longer than the unlink itself (100 files of 1 MiB are
/// freed twice as fast), and the directory's lock is held only for the latter. Small files
/// gain nothing from a second thread and are unlinked on this one.
fn unlink_all(dirfd: BorrowedFd<'_>, names: &mut Vec<CString>) -> rustix::io::Result<()> {
    let large = |name: &CString| {
        rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| (st.st_blocks as u64).saturating_mul(512) >= LARGE)
    };
    let (large, small): (Vec<CString>, Vec<CString>) = if names.len() < 2 {
        (Vec::new(), std::mem::take(names))
    } else {
        std::mem::take(names).into_iter().partition(large)
    };
    let unlink = |names: &[CString]| {
        names
            .iter()
            .try_for_each(|name| unlink_entry(dirfd, name, AtFlags::empty()))
    };
    if large.len() < 2 {
        return unlink(&large).and(unlink(&small));
    }
    let (theirs, mine) = large.split_at(large.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| unlink(theirs));
        let done = unlink(mine).and(unlink(&small));
        other.join().unwrap_or(Err(Errno::IO)).and(done)
    })
}

/// Removes `name` in `parent` and everything below it. A missing entry is not an error.
/// `shown` names the tree in error messages. Holds at most [`crate::walk::MAX_OPEN`] directories
/// open, whatever the depth. A directory's non-directories are unlinked in batches once
/// listed ([`unlink_all`]), each batch before the walk leaves the directory.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &CStr, shown: &str) -> Result<()> {
    let fail = |what: &str, e: Errno| Error::errno(format!("removing {shown}: {what}"), e);
    let top = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(fail("stat", e)),
    };
    if FileType::from_raw_mode(top.st_mode) != FileType::Directory {
        return unlink_entry(parent, name, AtFlags::empty()).map_err(|e| fail("unlink", e));
    }
    let root_mnt = mount_id(parent, name).map_err(|e| fail("statx", e))?;
    let fd = open_subdir(parent, name).map_err(|e| fail("open", e))?;
    let mut stack = DirStack::new(fd).map_err(|e| fail("read", e))?;
    // The current directory's non-directories not yet unlinked: unlinked before the walk
    // leaves it, to enter a subdirectory or because its listing ended.
    let mut pending: Vec<CString> = Vec::new();
    loop {
        match stack.next_entry() {
            Some(Ok(entry)) => {
                let dirfd = stack.fd().map_err(|e| fail("fd", e))?;
                let child = entry.name;
                let is_dir = match entry.kind {
                    FileType::Directory => true,
                    FileType::Unknown => {
                        rustix::fs::statat(dirfd, &child, AtFlags::SYMLINK_NOFOLLOW)
                            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                            .map_err(|e| fail("stat", e))?
                    }
                    _ => false,
                };
                if !is_dir {
                    pending.push(child);
                    if pending.len() >= PENDING {
                        unlink_all(dirfd, &mut pending).map_err(|e| fail("unlink", e))?;
                    }
                    continue;
                }
                unlink_all(dirfd, &mut pending).map_err(|e| fail("unlink", e))?;
                if mount_id(dirfd, &child).map_err(|e| fail("statx", e))? != root_mnt {
                    return Err(Error::new(
                        ErrorKind::Busy { holder: None },
                        format!(
                            "removing {shown}: a filesystem is mounted on {:?} inside it; unmount it first",
                            child
                        ),
                    ));
                }
                let fd = open_subdir(dirfd, &child).map_err(|e| fail("open", e))?;
                stack.push(fd, &child).map_err(|e| fail("read", e))?;
            }
            Some(Err(e)) => return Err(fail("read directory", e)),
            None => {
                let dirfd = stack.fd().map_err(|e| fail("fd", e))?;
                unlink_all(dirfd, &mut pending).map_err(|e| fail("unlink", e))?;
                match stack.pop().map_err(|e| fail("reopen a directory", e))? {
                    Some(emptied) => {
                        let below = stack.fd().map_err(|e| fail("fd", e))?;
                        unlink_entry(below, &emptied, AtFlags::REMOVEDIR)
                            .map_err(|e| fail("rmdir", e))?;
                    }
                    None => break,
                }
            }
        }
    }
    drop(stack);
    unlink_entry(parent, name, AtFlags::REMOVEDIR).map_err(|e| fail("rmdir", e))
}

/// Bytes allocated (`st_blocks`) and inodes in the tree below `root`, hardlinks counted once.
/// Does not descend into other mounts; holds at most [`crate::walk::MAX_OPEN`] directories open.
pub fn usage(root: BorrowedFd<'_>) -> Result<(u64, u64)> {
    let fail = |e: Errno| Error::errno("measuring volume usage", e);
    let root_mnt = mount_id(root, c"").map_err(fail)?;
    let st = rustix::fs::fstat(root).map_err(fail)?;
    let mut bytes = st.st_blocks as u64 * 512;
    let mut inodes = 1u64;
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    let dup = rustix::io::fcntl_dupfd_cloexec(root, 0).map_err(fail)?;
    let mut stack = DirStack::new(dup).map_err(fail)?;
    loop {
        match stack.next_entry() {
            Some(Ok(entry)) => {
                let dirfd = stack.fd().map_err(fail)?;
                let name = entry.name;
                let st = match rustix::fs::statat(dirfd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(fail(e)),
                };
                let kind = FileType::from_raw_mode(st.st_mode);
                if kind != FileType::Directory
                    && st.st_nlink > 1
                    && !seen_links.insert((st.st_dev as u64, st.st_ino as u64))
                {
                    continue;
                }
                bytes += st.st_blocks as u64 * 512;
                inodes += 1;
                if kind == FileType::Directory && mount_id(dirfd, &name).map_err(fail)? == root_mnt
                {
                    let fd = open_subdir(dirfd, &name).map_err(fail)?;
                    stack.push(fd, &name).map_err(fail)?;
                }
            }
            Some(Err(e)) => return Err(fail(e)),
            None => {
                if stack.pop().map_err(fail)?.is_none() {
                    break;
                }
            }
        }
    }
    Ok((bytes, inodes))
}

/// Removes everything inside the directory `root` (which stays, with its own metadata), with
/// [`remove_tree`]'s rules: nothing followed, no other mount entered.
pub fn empty(root: BorrowedFd<'_>, shown: &str) -> Result<()> {
    let fail = |e: Errno| Error::errno(format!("emptying {shown}"), e);
    let fd = rustix::fs::openat(
        root,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    let mut names = Vec::new();
    let mut dir = Dir::new(fd).map_err(fail)?;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(fail)?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    for name in names {
        remove_tree(root, &name, shown)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// More non-directories in one directory than one batch holds, large files unlinked on
    /// two threads, small ones, symlinks and nested directories: all of it goes, and nothing
    /// a symlink points to.
    #[test]
    fn remove_tree_removes_batches_of_small_and_large_files() {
        let base = std::env::temp_dir().join(format!("reimage-tree-{}", std::process::id()));
        let top = base.join("top");
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        let outside = base.join("outside");
        std::fs::write(&outside, b"kept").unwrap();
        for i in 0..PENDING + 50 {
            std::fs::write(top.join(format!("small{i}")), b"x").unwrap();
        }
        for i in 0..5 {
            std::fs::write(
                top.join(format!("a/large{i}")),
                vec![7u8; 2 * LARGE as usize],
            )
            .unwrap();
        }
        std::os::unix::fs::symlink(&outside, top.join("a/b/link")).unwrap();
        std::fs::write(top.join("a/b/last"), b"y").unwrap();
        let parent = std::fs::File::open(&base).unwrap();
        remove_tree(parent.as_fd(), c"top", "top").unwrap();
        assert!(!top.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"kept");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
