//! A private directory of small records (the journal, the volume locks, the measure cache,
//! the btrfs lineage), reached through one open descriptor. The state directory is opened
//! once per request; every record below it is named by one component relative to an open
//! directory, so no path is resolved again after the check, and a symlink put in place of
//! a record or a directory is never followed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

/// The mode of every directory made here: records are root's business alone.
const PRIVATE: u32 = 0o700;

pub struct RecordDir {
    fd: OwnedFd,
    /// For messages only; never used to reach anything.
    path: PathBuf,
}

fn component(name: &str) -> io::Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a record name"),
        ));
    }
    Ok(name)
}

fn directory_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl RecordDir {
    /// Opens the directory at `path`, making it (and its parents) with mode 0700 where
    /// missing. It must be a directory, not a symlink to one.
    pub fn open(path: &Path) -> io::Result<RecordDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE)
            .create(path)?;
        let fd = rustix::fs::open(path, directory_flags(), Mode::empty())?;
        Ok(RecordDir {
            fd,
            path: path.to_owned(),
        })
    }

    /// An already open directory (a pool's own, at `path`) used as one of records.
    pub fn of(fd: OwnedFd, path: &Path) -> RecordDir {
        RecordDir {
            fd,
            path: path.to_owned(),
        }
    }

    /// The subdirectory `name`, made with mode 0700 when missing.
    pub fn sub(&self, name: &str) -> io::Result<RecordDir> {
        let name = component(name)?;
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(PRIVATE)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(&self.fd, name, directory_flags(), Mode::empty())?;
        Ok(RecordDir {
            fd,
            path: self.path.join(name),
        })
    }

    /// The subdirectory at `names` below this one (each made with mode 0700 when missing):
    /// `["journal", POOL]`.
    pub fn area(&self, names: &[&str]) -> io::Result<RecordDir> {
        let (first, rest) = names
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no directory named"))?;
        rest.iter()
            .try_fold(self.sub(first)?, |dir, name| dir.sub(name))
    }

    /// Where the directory is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record's bytes, or `None` when there is none.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let fd = match self.open_file(name, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)?;
        Ok(Some(bytes))
    }

    /// Opens the record `name` with `flags` (and `NOFOLLOW`, `CLOEXEC`); created with mode
    /// 0600 when `flags` say `CREATE`.
    pub fn open_file(&self, name: &str, flags: OFlags) -> io::Result<OwnedFd> {
        let name = component(name)?;
        Ok(rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?)
    }

    /// The record's status, or `None` when there is none.
    pub fn stat(&self, name: &str) -> io::Result<Option<rustix::fs::Stat>> {
        match rustix::fs::statat(&self.fd, component(name)?, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the record atomically: written under a temporary name, then renamed over
    /// it. With `durable`, the file and the directory are synced, so the new record is
    /// there after a crash; without, a crash may leave the old one (a cache).
    pub fn replace(&self, name: &str, bytes: &[u8], durable: bool) -> io::Result<()> {
        let name = component(name)?;
        let tmp = format!(".{name}.tmp");
        let fd = self.open_file(&tmp, OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC)?;
        let mut file = std::fs::File::from(fd);
        io::Write::write_all(&mut file, bytes)?;
        if durable {
            file.sync_all()?;
        }
        rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
        if durable {
            self.sync()?;
        }
        Ok(())
    }

    /// Removes the record; false when there was none.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        match rustix::fs::unlinkat(&self.fd, component(name)?, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the directory's entries (new, renamed and removed records) durable.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// The names of the records (and subdirectories) in the directory.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(self.fd.as_fd())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(names)
    }
}
