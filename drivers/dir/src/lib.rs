//! The `dir` driver: each volume is a plain directory directly under the pool's `path` (the
//! naming, renames and swaps are [`PoolDir`]'s). Destroying a volume removes its tree
//! fd-relative, never following a symlink and never crossing into a mount.
//!
//! Image volumes (`image_volumes = true`, only on a filesystem with reflinks: btrfs, xfs) are
//! directories beside the volumes ([`reimage_driver::pooldir::PoolDir`]'s image methods). A
//! volume filled from one is a copy the core makes of its tree, every file a reflink
//! ([`Cloned::CopyFrom`]): it shares the image volume's blocks but depends on nothing, so an
//! image volume can always be removed. Which image volume a volume was copied from is
//! recorded beside it, outside its tree, in `.reimage-copy.INO` (its root directory's inode
//! number, which renames and swaps keep): `images` lists those volumes as the image volume's
//! users and `prune` keeps it for them, since removing it would free almost nothing while
//! they share its blocks. A record lost or changed by hand only changes what `prune` keeps.
//!
//! Sizes: with `quota = true` on a filesystem that has project quotas (ext4, xfs), each
//! volume is a project ([`project`]) limited to its size; otherwise `size` is advisory and
//! the core warns about it (and about a filesystem without project quotas).

pub mod project;

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use reimage_driver::pooldir::PoolDir;
use reimage_driver::records::RecordDir;
use reimage_driver::{
    slot_named, tree, Capabilities, Cloned, Driver, Error, ErrorKind, ImageKey, ImageVolume,
    KeepSnapshots, Mounted, PoolSpace, PoolWarning, Result, SizeModel, Slot, SlotKind, Usage,
    VolumeName,
};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// The prefix of a copy's record: `.reimage-copy.INO` holds the key of the image volume the
/// volume whose root has inode INO was copied from.
const COPY_RECORD_PREFIX: &str = ".reimage-copy.";

fn copy_record(ino: u64) -> String {
    format!("{COPY_RECORD_PREFIX}{ino}")
}

/// Why the filesystem of the directory `dir` cannot share a file's blocks with a copy
/// (`FICLONE`), or `None` when it can. Probed with two unnamed files that vanish with it.
pub fn no_reflinks(dir: BorrowedFd<'_>) -> Option<String> {
    let tmpfile = || {
        rustix::fs::openat(
            dir,
            c".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    let probe = tmpfile().and_then(|a| {
        let b = tmpfile()?;
        rustix::fs::ioctl_ficlone(&b, &a)
    });
    match probe {
        Ok(()) => None,
        Err(Errno::OPNOTSUPP | Errno::NOTTY | Errno::INVAL | Errno::XDEV) => Some(
            "its filesystem has no reflinks (FICLONE); image volumes on a dir pool need btrfs or xfs (mkfs.xfs -m reflink=1)".to_owned(),
        ),
        Err(e) => Some(format!(
            "probing it for reflinks failed: {}",
            std::io::Error::from(e)
        )),
    }
}

pub struct DirDriver {
    pool: PoolDir,
    /// The pool directory as one of records: the copy records beside the volumes.
    records: RecordDir,
    /// Project quotas are asked for and the filesystem has them.
    quota: bool,
    /// Asked for but not available, and why.
    quota_unavailable: Option<String>,
    /// The pool is on xfs, whose project quotas fail writes with ENOSPC.
    xfs: bool,
    /// The pool keeps image volumes (its filesystem has reflinks).
    image_volumes: bool,
}

impl DirDriver {
    /// Opens the pool directory (see [`PoolDir::open`]); `quota` asks for project quotas,
    /// `image_volumes` for image volumes: `Unsupported` where the filesystem has no reflinks.
    pub fn open(path: &Path, quota: bool, image_volumes: bool) -> Result<Self> {
        let pool = PoolDir::open(path)?;
        if let Some(why) = image_volumes
            .then(|| no_reflinks(pool.fd.as_fd()))
            .flatten()
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("pool path {}: {why}", path.display()),
            ));
        }
        let quota_unavailable = quota
            .then(|| project::unsupported(pool.fd.as_fd()))
            .flatten();
        const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
        let xfs = rustix::fs::fstatfs(&pool.fd).is_ok_and(|st| st.f_type == XFS_SUPER_MAGIC);
        let records = RecordDir::of(
            pool.fd
                .try_clone()
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
            path,
        );
        Ok(DirDriver {
            xfs,
            image_volumes,
            records,
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

    /// The root inode of the volume in `slot`, `None` when the slot is empty.
    fn inode(&self, slot: Slot<'_>) -> Result<Option<u64>> {
        Ok(self.pool.stat(slot)?.map(|st| st.st_ino))
    }

    /// The copy records among the pool directory's `names`: (root inode, image key, the
    /// record's name). One removed meanwhile, or not holding a key, is not one.
    fn copy_records(&self, names: &[String]) -> Vec<(u64, ImageKey, String)> {
        names
            .iter()
            .filter_map(|name| {
                let ino = name.strip_prefix(COPY_RECORD_PREFIX)?.parse().ok()?;
                let bytes = self.records.read(name).ok()??;
                let key = ImageKey::parse(std::str::from_utf8(&bytes).ok()?.trim_end())?;
                Some((ino, key, name.clone()))
            })
            .collect()
    }

    fn remove_record(&self, name: &str) -> Result<()> {
        self.records.remove(name).map(drop).map_err(|e| {
            Error::io(
                format!("removing {}", self.pool.path.join(name).display()),
                e,
            )
        })
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
            image_volumes: self.image_volumes,
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

    /// The copy record goes first: a slot left without it is still removed by recovery.
    fn destroy(&self, slot: Slot<'_>, _with_snapshots: bool) -> Result<()> {
        if let Some(ino) = self.inode(slot)? {
            self.remove_record(&copy_record(ino))?;
        }
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

    fn create_image(&self, key: &ImageKey, _size: Option<u64>) -> Result<()> {
        self.pool.create_image_dir(key)
    }

    fn open_image(&self, key: &ImageKey) -> Result<Mounted> {
        Ok(Mounted::unmanaged(self.pool.require_image_dir(key, false)?))
    }

    fn seal_image(&self, building: &ImageKey, key: &ImageKey) -> Result<()> {
        self.pool.seal_image_dir(building, key)
    }

    /// An empty volume and its copy record, for the core to fill with a reflink copy.
    fn clone_image(&self, key: &ImageKey, slot: Slot<'_>) -> Result<Cloned> {
        let image = self.pool.require_image_dir(key, true)?;
        self.create(slot, None)?;
        let ino = self
            .inode(slot)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} vanished")))?;
        let name = copy_record(ino);
        let record = self
            .records
            .open_file(&name, OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC)
            .and_then(|fd| {
                std::io::Write::write_all(
                    &mut std::fs::File::from(fd),
                    format!("{key}\n").as_bytes(),
                )
            });
        record.map_err(|e| {
            Error::io(
                format!("writing {}", self.pool.path.join(&name).display()),
                e,
            )
        })?;
        Ok(Cloned::CopyFrom(Mounted::unmanaged(image)))
    }

    /// Users of a sealed image volume: the volumes (and temporary slots) recorded as its copies.
    fn images(&self) -> Result<Vec<ImageVolume>> {
        let names = self.pool.names()?;
        let slots: Vec<(u64, String)> = names
            .iter()
            .filter_map(|name| {
                let (volume, kind) = slot_named(name)?;
                let ino = self
                    .inode(Slot {
                        volume: &volume,
                        kind,
                    })
                    .ok()??;
                Some((ino, volume.as_str().to_owned()))
            })
            .collect();
        let records = self.copy_records(&names);
        Ok(self
            .pool
            .image_dirs()?
            .into_iter()
            .map(|(key, sealed)| {
                let mut clones: Vec<String> = records
                    .iter()
                    .filter(|(_, used, _)| sealed && *used == key)
                    .flat_map(|(ino, _, _)| slots.iter().filter(move |(i, _)| i == ino))
                    .map(|(_, volume)| volume.clone())
                    .collect();
                clones.sort();
                clones.dedup();
                ImageVolume {
                    key,
                    sealed,
                    clones,
                    holders: Vec::new(),
                }
            })
            .collect())
    }

    /// Copies share blocks with the image volume but never depend on it. Records naming it
    /// go with it (those of volumes removed by hand, since the core destroys only an image
    /// volume without users).
    fn destroy_image(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        self.pool.remove_image_dir(key, sealed)?;
        for (_, used, name) in self.copy_records(&self.pool.names()?) {
            if used == *key {
                self.remove_record(&name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (tempfile_dir::TempDir, DirDriver) {
        let dir = tempfile_dir::TempDir::new();
        let driver = DirDriver::open(dir.path(), false, false).unwrap();
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
