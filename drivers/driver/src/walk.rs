//! The stack of a depth-first walk over a directory tree, holding at most [`MAX_OPEN`] open
//! directories whatever the depth: a legal tree can be thousands of levels deep, and a walk
//! that keeps one descriptor per level runs out of them (the usual soft limit is 1024).
//!
//! Deeper than that, the shallowest open levels are closed, remembering each directory's
//! identity (device and inode) and the child the walk entered. Climbing back to a closed
//! level reopens it through the child's `..` (never by path, so no length limit), checks it is
//! the same directory, and continues its listing after that child. The listing order of a
//! directory is stable while entries are removed from it (ext4, xfs, btrfs, zfs, tmpfs), so
//! nothing is visited twice or skipped; a tree that changes under the walk is an error.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Open directories a walk holds at most.
pub const MAX_OPEN: usize = 16;

struct Level {
    dir: Option<Dir>,
    dev: u64,
    ino: u64,
    /// The name of this directory in the level below it (empty for the first level).
    name: CString,
}

pub struct DirStack {
    levels: Vec<Level>,
    open: usize,
}

/// Opens the directory `name` in `dirfd` without following a symlink.
pub fn open_dir(dirfd: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn identity(fd: BorrowedFd<'_>) -> rustix::io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// One entry of a listing: its name and its type as the directory reports it
/// (`FileType::Unknown` on filesystems that do not say).
pub struct Entry {
    pub name: CString,
    pub kind: FileType,
}

impl DirStack {
    /// A walk that starts in the directory `fd`.
    pub fn new(fd: OwnedFd) -> rustix::io::Result<DirStack> {
        let (dev, ino) = identity(fd.as_fd())?;
        Ok(DirStack {
            levels: vec![Level {
                dir: Some(Dir::new(fd)?),
                dev,
                ino,
                name: CString::default(),
            }],
            open: 1,
        })
    }

    /// Levels on the stack (1 when only the starting directory is).
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    fn top(&self) -> rustix::io::Result<&Dir> {
        self.levels
            .last()
            .and_then(|l| l.dir.as_ref())
            .ok_or(Errno::BADF)
    }

    /// The directory at the top of the stack (always open).
    pub fn fd(&self) -> rustix::io::Result<BorrowedFd<'_>> {
        self.top()?.fd()
    }

    /// The next entry of the directory at the top, `.` and `..` left out; `None` when its
    /// listing is done.
    pub fn next_entry(&mut self) -> Option<rustix::io::Result<Entry>> {
        let dir = self.levels.last_mut()?.dir.as_mut()?;
        loop {
            match dir.read()? {
                Ok(e) => {
                    let name = e.file_name();
                    if name.to_bytes() == b"." || name.to_bytes() == b".." {
                        continue;
                    }
                    return Some(Ok(Entry {
                        name: name.to_owned(),
                        kind: e.file_type(),
                    }));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Enters `fd`, the directory `name` of the top level.
    pub fn push(&mut self, fd: OwnedFd, name: &CStr) -> rustix::io::Result<()> {
        let (dev, ino) = identity(fd.as_fd())?;
        self.levels.push(Level {
            dir: Some(Dir::new(fd)?),
            dev,
            ino,
            name: name.to_owned(),
        });
        self.open += 1;
        if self.open > MAX_OPEN {
            if let Some(level) = self.levels.iter_mut().find(|l| l.dir.is_some()) {
                level.dir = None;
                self.open -= 1;
            }
        }
        Ok(())
    }

    /// Leaves the top level and returns its name in the level below, which is open again
    /// afterwards and continues after that name. `None` when the starting level was left.
    pub fn pop(&mut self) -> rustix::io::Result<Option<CString>> {
        let Some(left) = self.levels.pop() else {
            return Ok(None);
        };
        if left.dir.is_some() {
            self.open -= 1;
        }
        let Some(below) = self.levels.last_mut() else {
            return Ok(None);
        };
        if below.dir.is_none() {
            let child = left.dir.as_ref().ok_or(Errno::BADF)?;
            let fd = open_dir(child.fd()?, c"..")?;
            if identity(fd.as_fd())? != (below.dev, below.ino) {
                return Err(Errno::STALE);
            }
            let mut dir = Dir::new(fd)?;
            loop {
                match dir.read() {
                    Some(Ok(e)) if e.file_name() == left.name.as_c_str() => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    // The child is gone from its parent: the tree changed under the walk.
                    None => return Err(Errno::STALE),
                }
            }
            below.dir = Some(dir);
            self.open += 1;
        }
        Ok(Some(left.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_tree_is_walked_with_few_descriptors() {
        let root = std::env::temp_dir().join(format!("reimage-walk-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let top = open_dir(
            rustix::fs::CWD,
            &CString::new(root.to_str().unwrap()).unwrap(),
        )
        .unwrap();
        // 300 levels, each with a file before and after the way down.
        let mut fd = rustix::io::fcntl_dupfd_cloexec(&top, 0).unwrap();
        for _ in 0..300 {
            for f in [c"a", c"z"] {
                rustix::fs::openat(&fd, f, OFlags::CREATE | OFlags::WRONLY, Mode::RUSR).unwrap();
            }
            rustix::fs::mkdirat(&fd, c"m", Mode::RWXU).unwrap();
            fd = open_dir(fd.as_fd(), c"m").unwrap();
        }
        drop(fd);
        let mut stack = DirStack::new(rustix::io::fcntl_dupfd_cloexec(&top, 0).unwrap()).unwrap();
        let (mut files, mut dirs, mut deepest) = (0, 0, 0);
        loop {
            match stack.next_entry() {
                Some(e) => {
                    let e = e.unwrap();
                    if e.kind == FileType::Directory {
                        dirs += 1;
                        let fd = open_dir(stack.fd().unwrap(), &e.name).unwrap();
                        stack.push(fd, &e.name).unwrap();
                        deepest = deepest.max(stack.depth());
                        assert!(stack.open <= MAX_OPEN);
                    } else {
                        files += 1;
                    }
                }
                None => {
                    if stack.pop().unwrap().is_none() {
                        break;
                    }
                }
            }
        }
        assert_eq!((files, dirs, deepest), (600, 300, 301));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
