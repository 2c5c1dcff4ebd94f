//! A pool that is one directory holding one entry per volume (the dir and btrfs drivers).
//!
//! Temporary slots are siblings named `.reimage-new.VOLUME` and `.reimage-old.VOLUME`, which no
//! volume name can be (volume names start with a letter or digit). Every operation is relative
//! to the pool directory's fd and names exactly one component, so nothing is ever resolved
//! through a symlink; swaps are `renameat2(RENAME_EXCHANGE)`.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::{
    find_holder, holder_of_mount_below, Error, ErrorKind, Mounted, Result, Slot, SlotKind,
    VolumeName,
};

pub struct PoolDir {
    pub path: PathBuf,
    pub fd: OwnedFd,
}

impl PoolDir {
    /// Opens the pool directory. It must exist and be a directory (not a symlink): the
    /// administrator creates it, reimage never guesses where a pool should live.
    pub fn open(path: &Path) -> Result<PoolDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => Error::new(
                ErrorKind::NotFound,
                format!(
                    "pool directory {} does not exist; create it (mkdir -p) or fix the pool's path",
                    path.display()
                ),
            ),
            Errno::NOTDIR | Errno::LOOP => Error::new(
                ErrorKind::Failed,
                format!(
                    "pool path {} is not a directory (symlinks are not followed)",
                    path.display()
                ),
            ),
            e => Error::errno(format!("opening pool directory {}", path.display()), e),
        })?;
        Ok(PoolDir {
            path: path.to_owned(),
            fd,
        })
    }

    pub fn physical(slot: Slot<'_>) -> String {
        slot.physical_name()
    }

    pub fn cname(slot: Slot<'_>) -> CString {
        // Volume names are validated ASCII without NUL, so this cannot fail.
        CString::new(Self::physical(slot)).unwrap_or_default()
    }

    pub fn path_of(&self, slot: Slot<'_>) -> PathBuf {
        self.path.join(Self::physical(slot))
    }

    /// The stat of a slot's directory, `None` when the slot is empty. Anything but a
    /// directory under a volume's name is an error: a driver never touches what it did not
    /// make.
    pub fn stat(&self, slot: Slot<'_>) -> Result<Option<rustix::fs::Stat>> {
        match rustix::fs::statat(&self.fd, Self::cname(slot), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(Some(st)),
            Ok(_) => Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "{} is not a directory; reimage leaves it alone (move it away by hand)",
                    self.path_of(slot).display()
                ),
            )),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(Error::errno(
                format!("stat {}", self.path_of(slot).display()),
                e,
            )),
        }
    }

    pub fn require(&self, slot: Slot<'_>) -> Result<()> {
        match self.stat(slot)? {
            Some(_) => Ok(()),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("{slot} does not exist"),
            )),
        }
    }

    pub fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        rustix::fs::renameat_with(
            &self.fd,
            Self::cname(from),
            &self.fd,
            Self::cname(to),
            RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            Errno::EXIST => Error::new(ErrorKind::AlreadyExists, format!("{to} already exists")),
            Errno::NOENT => Error::new(ErrorKind::NotFound, format!("{from} does not exist")),
            e => Error::errno(format!("renaming {from} to {to}"), e),
        })
    }

    pub fn exchange(&self, a: Slot<'_>, b: Slot<'_>) -> Result<()> {
        rustix::fs::renameat_with(
            &self.fd,
            Self::cname(a),
            &self.fd,
            Self::cname(b),
            RenameFlags::EXCHANGE,
        )
        .map_err(|e| Error::errno(format!("exchanging {a} and {b}"), e))
    }

    pub fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        let fd = rustix::fs::openat(
            &self.fd,
            Self::cname(slot),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => Error::new(ErrorKind::NotFound, format!("{slot} does not exist")),
            e => Error::errno(format!("opening {}", self.path_of(slot).display()), e),
        })?;
        Ok(Mounted::unmanaged(fd))
    }

    pub fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        let path = self.path_of(slot);
        if let Some(mount) = holder_of_mount_below(&path)
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?
        {
            return Ok(Some(mount));
        }
        find_holder(&path).map_err(|e| Error::io("scanning /proc", e))
    }

    /// The names of the pool directory's entries that are valid UTF-8 (all of reimage's are).
    pub fn names(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.path)
            .map_err(|e| Error::io(format!("listing {}", self.path.display()), e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io(format!("listing {}", self.path.display()), e))?;
            names.extend(entry.file_name().to_str().map(str::to_owned));
        }
        Ok(names)
    }

    pub fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        let mut found: Vec<_> = self
            .names()?
            .iter()
            .filter_map(|name| crate::temporary_slot(name))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// The slot directory's `dev:ino`, or `None` when the slot is empty.
    pub fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        Ok(self
            .stat(slot)?
            .map(|st| format!("{}:{}", st.st_dev, st.st_ino)))
    }

    /// Removes the slot's directory tree ([`crate::tree::remove_tree`]'s rules); an empty
    /// slot is not an error.
    pub fn remove(&self, slot: Slot<'_>) -> Result<()> {
        if self.stat(slot)?.is_none() {
            return Ok(());
        }
        crate::tree::remove_tree(
            std::os::fd::AsFd::as_fd(&self.fd),
            &Self::cname(slot),
            &self.path_of(slot).display().to_string(),
        )
    }

    /// The space of the filesystem the pool is on.
    pub fn space(&self) -> Result<crate::PoolSpace> {
        let st = self.statvfs()?;
        Ok(crate::PoolSpace {
            available: st.f_bavail.saturating_mul(st.f_frsize),
            total: st.f_blocks.saturating_mul(st.f_frsize),
            inodes_available: (st.f_files > 0).then_some(st.f_favail),
            provisioned: None,
        })
    }

    pub fn statvfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(&self.fd)
            .map_err(|e| Error::errno(format!("statvfs {}", self.path.display()), e))
    }
}
