//! The `dir` driver: each volume is a plain directory directly under the pool's `path`.
//!
//! Temporary slots are sibling directories whose names start with `.reimage-`, which no
//! volume name can (volume names start with a letter or digit). Every operation is relative
//! to the pool directory's fd and names exactly one component, so nothing is ever resolved
//! through a symlink. Swaps are `renameat2(RENAME_EXCHANGE)`, atomic on every Linux
//! filesystem that supports it.
//!
//! Sizes: the dir driver has no limits yet (project quotas come later), so `size` is
//! advisory and the core warns about it.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use reimage_driver::{
    find_holder, holder_of_mount_below, tree, Capabilities, Driver, Error, ErrorKind, Mounted,
    PoolSpace, Result, SizeModel, Slot, SlotKind, Usage, VolumeName,
};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

const NEW_PREFIX: &str = ".reimage-new.";
const OLD_PREFIX: &str = ".reimage-old.";

pub struct DirDriver {
    path: PathBuf,
    pool: OwnedFd,
}

impl DirDriver {
    /// Opens the pool directory. It must exist and be a directory (not a symlink): the
    /// administrator creates it, reimage never guesses where a pool should live.
    pub fn open(path: &Path) -> Result<Self> {
        let pool = rustix::fs::open(
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
        Ok(DirDriver {
            path: path.to_owned(),
            pool,
        })
    }

    fn physical(slot: Slot<'_>) -> String {
        match slot.kind {
            SlotKind::Live => slot.volume.as_str().to_owned(),
            SlotKind::New => format!("{NEW_PREFIX}{}", slot.volume),
            SlotKind::Old => format!("{OLD_PREFIX}{}", slot.volume),
        }
    }

    fn cname(slot: Slot<'_>) -> CString {
        // Volume names are validated ASCII without NUL, so this cannot fail.
        CString::new(Self::physical(slot)).unwrap_or_default()
    }

    fn path_of(&self, slot: Slot<'_>) -> PathBuf {
        self.path.join(Self::physical(slot))
    }

    /// The stat of a slot's directory, `None` when the slot is empty. Anything but a
    /// directory under a volume's name is an error: the driver never touches what it did
    /// not make.
    fn stat_slot(&self, slot: Slot<'_>) -> Result<Option<rustix::fs::Stat>> {
        match rustix::fs::statat(&self.pool, Self::cname(slot), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(Some(st)),
            Ok(_) => Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "{} is not a directory; the dir driver leaves it alone (move it away by hand)",
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

    fn require(&self, slot: Slot<'_>) -> Result<()> {
        match self.stat_slot(slot)? {
            Some(_) => Ok(()),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("{slot} does not exist"),
            )),
        }
    }
}

impl Driver for DirDriver {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshots: false,
            keep_snapshots: false,
            size_model: SizeModel::Unlimited,
            shrink: false,
            exchange: true,
            cheap_usage: false,
        }
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        Ok(self
            .stat_slot(slot)?
            .map(|st| format!("{}:{}", st.st_dev, st.st_ino)))
    }

    fn create(&self, slot: Slot<'_>, _size: Option<u64>) -> Result<()> {
        rustix::fs::mkdirat(&self.pool, Self::cname(slot), Mode::from_raw_mode(0o755)).map_err(
            |e| match e {
                Errno::EXIST => {
                    Error::new(ErrorKind::AlreadyExists, format!("{slot} already exists"))
                }
                e => Error::errno(format!("creating {}", self.path_of(slot).display()), e),
            },
        )
    }

    fn destroy(&self, slot: Slot<'_>, _with_snapshots: bool) -> Result<()> {
        if self.stat_slot(slot)?.is_none() {
            return Ok(());
        }
        tree::remove_tree(
            self.pool.as_fd(),
            &Self::cname(slot),
            &self.path_of(slot).display().to_string(),
        )
    }

    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        self.require(slot)?;
        Ok(Vec::new())
    }

    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        rustix::fs::renameat_with(
            &self.pool,
            Self::cname(from),
            &self.pool,
            Self::cname(to),
            RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            Errno::EXIST => Error::new(ErrorKind::AlreadyExists, format!("{to} already exists")),
            Errno::NOENT => Error::new(ErrorKind::NotFound, format!("{from} does not exist")),
            e => Error::errno(format!("renaming {from} to {to}"), e),
        })
    }

    fn exchange(&self, a: Slot<'_>, b: Slot<'_>) -> Result<()> {
        rustix::fs::renameat_with(
            &self.pool,
            Self::cname(a),
            &self.pool,
            Self::cname(b),
            RenameFlags::EXCHANGE,
        )
        .map_err(|e| Error::errno(format!("exchanging {a} and {b}"), e))
    }

    fn usage(&self, slot: Slot<'_>) -> Result<Usage> {
        self.require(slot)?;
        let root = self.open_root(slot)?;
        let (used, inodes) = tree::usage(root.root())?;
        Ok(Usage {
            size: None,
            used,
            inodes: Some(inodes),
        })
    }

    fn set_size(&self, slot: Slot<'_>, _bytes: u64) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{slot}: the dir driver has no size limits on this pool"),
        ))
    }

    fn pool_space(&self) -> Result<PoolSpace> {
        let st = rustix::fs::fstatvfs(&self.pool)
            .map_err(|e| Error::errno(format!("statvfs {}", self.path.display()), e))?;
        Ok(PoolSpace {
            available: st.f_bavail.saturating_mul(st.f_frsize),
            total: st.f_blocks.saturating_mul(st.f_frsize),
            inodes_available: (st.f_files > 0).then_some(st.f_favail),
        })
    }

    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        let fd = rustix::fs::openat(
            &self.pool,
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

    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        let path = self.path_of(slot);
        if let Some(mount) = holder_of_mount_below(&path)
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?
        {
            return Ok(Some(mount));
        }
        find_holder(&path).map_err(|e| Error::io("scanning /proc", e))
    }

    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        let entries = std::fs::read_dir(&self.path)
            .map_err(|e| Error::io(format!("listing {}", self.path.display()), e))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io(format!("listing {}", self.path.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            for (prefix, kind) in [(NEW_PREFIX, SlotKind::New), (OLD_PREFIX, SlotKind::Old)] {
                if let Some(volume) = name.strip_prefix(prefix) {
                    if let Ok(volume) = VolumeName::parse(volume) {
                        found.push((volume, kind));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (tempfile_dir::TempDir, DirDriver) {
        let dir = tempfile_dir::TempDir::new();
        let driver = DirDriver::open(dir.path()).unwrap();
        (dir, driver)
    }

    /// A minimal self-removing temporary directory (the crate has no dev-dependencies).
    mod tempfile_dir {
        use std::path::{Path, PathBuf};
        pub struct TempDir(PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "reimage-dir-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                TempDir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn create_exchange_destroy() {
        let (dir, d) = pool();
        let v = VolumeName::parse("c1").unwrap();
        d.create(Slot::live(&v), None).unwrap();
        std::fs::write(dir.path().join("c1/old"), b"x").unwrap();
        d.create(Slot::new(&v), None).unwrap();
        std::fs::create_dir(dir.path().join(".reimage-new.c1/sub")).unwrap();
        std::fs::write(dir.path().join(".reimage-new.c1/sub/new"), b"y").unwrap();
        let new_id = d.identity(Slot::new(&v)).unwrap();
        d.exchange(Slot::live(&v), Slot::new(&v)).unwrap();
        assert_eq!(d.identity(Slot::live(&v)).unwrap(), new_id);
        assert_eq!(d.leftovers().unwrap(), vec![(v.clone(), SlotKind::New)]);
        d.destroy(Slot::new(&v), false).unwrap();
        assert!(dir.path().join("c1/sub/new").exists());
        assert!(d.leftovers().unwrap().is_empty());
        assert_eq!(d.identity(Slot::new(&v)).unwrap(), None);
    }

    #[test]
    fn create_refuses_an_existing_slot() {
        let (_dir, d) = pool();
        let v = VolumeName::parse("c1").unwrap();
        d.create(Slot::live(&v), None).unwrap();
        let err = d.create(Slot::live(&v), None).unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
    }

    #[test]
    fn a_symlink_under_a_volume_name_is_not_a_volume() {
        let (dir, d) = pool();
        let v = VolumeName::parse("c1").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("c1")).unwrap();
        assert!(d.identity(Slot::live(&v)).is_err());
        assert!(d.destroy(Slot::live(&v), false).is_err());
        assert!(std::path::Path::new("/etc/passwd").exists());
    }

    #[test]
    fn destroy_clears_immutable_flags_and_never_follows_symlinks() {
        let (dir, d) = pool();
        let v = VolumeName::parse("c1").unwrap();
        d.create(Slot::live(&v), None).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("c1/link")).unwrap();
        let locked = dir.path().join("c1/locked");
        std::fs::write(&locked, b"l").unwrap();
        let made_immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&locked)
            .status()
            .is_ok_and(|s| s.success());
        d.destroy(Slot::live(&v), false).unwrap();
        assert!(
            !dir.path().join("c1").exists(),
            "immutable flag set: {made_immutable}"
        );
        assert!(outside.join("keep").exists());
    }
}
