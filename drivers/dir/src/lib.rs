//! The `dir` driver: each volume is a plain directory directly under the pool's `path` (the
//! naming, renames and swaps are [`PoolDir`]'s). Destroying a volume removes its tree
//! fd-relative, never following a symlink and never crossing into a mount.
//!
//! Sizes: with `quota = true` on a filesystem that has project quotas (ext4, xfs), each
//! volume is a project ([`project`]) limited to its size; otherwise `size` is advisory and
//! the core warns about it (and about a filesystem without project quotas).

pub mod project;

use std::os::fd::AsFd;
use std::path::Path;

use reimage_driver::pooldir::PoolDir;
use reimage_driver::{
    tree, Capabilities, Driver, Error, ErrorKind, KeepSnapshots, Mounted, PoolSpace, PoolWarning,
    Result, SizeModel, Slot, SlotKind, Usage, VolumeName,
};
use rustix::fs::Mode;
use rustix::io::Errno;

pub struct DirDriver {
    pool: PoolDir,
    /// Project quotas are asked for and the filesystem has them.
    quota: bool,
    /// Asked for but not available, and why.
    quota_unavailable: Option<String>,
    /// The pool is on xfs, whose project quotas fail writes with ENOSPC.
    xfs: bool,
}

impl DirDriver {
    /// Opens the pool directory (see [`PoolDir::open`]); `quota` asks for project quotas.
    pub fn open(path: &Path, quota: bool) -> Result<Self> {
        let pool = PoolDir::open(path)?;
        let quota_unavailable = quota
            .then(|| project::unsupported(pool.fd.as_fd()))
            .flatten();
        const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
        let xfs = rustix::fs::fstatfs(&pool.fd).is_ok_and(|st| st.f_type == XFS_SUPER_MAGIC);
        Ok(DirDriver {
            xfs,
            quota: quota && quota_unavailable.is_none(),
            quota_unavailable,
            pool,
        })
    }

    /// The root of the volume in `slot` (a directory needs no mount).
    fn root(&self, slot: Slot<'_>) -> Result<Mounted> {
        self.pool.open_root(slot)
    }

    /// The volume's project, assigned to its tree first if it was made without one.
    fn project(&self, slot: Slot<'_>) -> Result<u32> {
        let root = self.root(slot)?;
        if project::is_assigned(root.root())? {
            project::id_of(root.root())
        } else {
            project::assign(root.root())
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
            keep_snapshots: KeepSnapshots::No,
            size_counts_snapshots: false,
            limit_reads_as_full: self.quota && self.xfs,
            size_model: if self.quota {
                SizeModel::Quota
            } else {
                SizeModel::Unlimited
            },
            shrink: self.quota,
            exchange: true,
            cheap_usage: self.quota,
            image_volumes: false,
            templates: false,
            late_limit: true,
            size_counts_image: true,
            full_at_size: false,
        }
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        self.pool.identity(slot)
    }

    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()> {
        rustix::fs::mkdirat(
            &self.pool.fd,
            PoolDir::cname(slot),
            Mode::from_raw_mode(0o755),
        )
        .map_err(|e| match e {
            Errno::EXIST => Error::new(ErrorKind::AlreadyExists, format!("{slot} already exists")),
            e => Error::errno(format!("creating {}", self.pool.path_of(slot).display()), e),
        })?;
        if self.quota {
            // An earlier directory with the same inode number may have left a limit: set it.
            let root = self.root(slot)?;
            let id = project::assign(root.root())?;
            project::set_limit(root.root(), id, size.unwrap_or(0))?;
        }
        Ok(())
    }

    fn destroy(&self, slot: Slot<'_>, _with_snapshots: bool) -> Result<()> {
        self.pool.remove(slot)
    }

    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        self.pool.require(slot)?;
        Ok(Vec::new())
    }

    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        self.pool.rename(from, to)
    }

    fn exchange(&self, a: Slot<'_>, b: Slot<'_>) -> Result<()> {
        self.pool.exchange(a, b)
    }

    fn usage(&self, slot: Slot<'_>) -> Result<Usage> {
        self.pool.require(slot)?;
        let root = self.open_root(slot)?;
        if self.quota && project::is_assigned(root.root())? {
            let id = project::id_of(root.root())?;
            let (size, used, inodes) = project::usage(root.root(), id)?;
            return Ok(Usage {
                size,
                used,
                inodes: Some(inodes),
            });
        }
        let (used, inodes) = tree::usage(root.root())?;
        Ok(Usage {
            size: None,
            used,
            inodes: Some(inodes),
        })
    }

    fn set_size(&self, slot: Slot<'_>, bytes: u64) -> Result<()> {
        if !self.quota {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{slot}: the dir driver has no size limits on this pool"),
            ));
        }
        let id = self.project(slot)?;
        project::set_limit(self.pool.fd.as_fd(), id, bytes)
    }

    fn warnings(&self) -> Vec<(PoolWarning, String)> {
        match &self.quota_unavailable {
            Some(why) => vec![(PoolWarning::QuotaUnavailable, why.clone())],
            None => Vec::new(),
        }
    }

    fn pool_space(&self) -> Result<PoolSpace> {
        self.pool.space()
    }

    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        self.pool.open_root(slot)
    }

    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        self.pool.busy(slot)
    }

    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        self.pool.leftovers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (tempfile_dir::TempDir, DirDriver) {
        let dir = tempfile_dir::TempDir::new();
        let driver = DirDriver::open(dir.path(), false).unwrap();
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
        d.create(Slot::building(&v), None).unwrap();
        std::fs::create_dir(dir.path().join(".reimage-new.c1/sub")).unwrap();
        std::fs::write(dir.path().join(".reimage-new.c1/sub/new"), b"y").unwrap();
        let new_id = d.identity(Slot::building(&v)).unwrap();
        d.exchange(Slot::live(&v), Slot::building(&v)).unwrap();
        assert_eq!(d.identity(Slot::live(&v)).unwrap(), new_id);
        assert_eq!(d.leftovers().unwrap(), vec![(v.clone(), SlotKind::New)]);
        d.destroy(Slot::building(&v), false).unwrap();
        assert!(dir.path().join("c1/sub/new").exists());
        assert!(d.leftovers().unwrap().is_empty());
        assert_eq!(d.identity(Slot::building(&v)).unwrap(), None);
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
