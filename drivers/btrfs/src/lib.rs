//! The `btrfs` driver: each volume is a subvolume directly under the pool's `path` (named,
//! renamed and swapped as [`PoolDir`] does; `renameat2(RENAME_EXCHANGE)` swaps two subvolume
//! roots atomically).
//!
//! Everything goes through ioctls ([`ioctl`]), never through the `btrfs` command's output:
//! subvolume create and delete (by id), subvolume info (the uuid is the volume's identity),
//! the child subvolumes a container made itself (deleted deepest first, read-only ones made
//! writable first), snapshots found through the native relation (a snapshot's parent uuid is
//! its origin's uuid), qgroup limits on referenced bytes of the level-0 qgroup, and free space
//! from the allocator's figures rather than statfs.
//!
//! Quotas are touched only when the pool says `quota = true`; then they are enabled if needed.

pub mod ioctl;

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use reimage_driver::image::{image_name, parse_image_name};
use reimage_driver::pooldir::PoolDir;
use reimage_driver::records::RecordDir;
use reimage_driver::{
    temporary_slot, tree, Capabilities, Cloned, Driver, Error, ErrorKind, ImageKey, ImageVolume,
    KeepSnapshots, Mounted, PoolSpace, Result, SizeModel, Slot, SlotKind, Usage, VolumeName,
};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// A subvolume's root directory has this inode number.
const SUBVOL_ROOT_INO: u64 = 256;

pub struct BtrfsDriver {
    pool: PoolDir,
    quota: bool,
    /// Image volumes: subvolumes `.reimage-image-new.KEY` while built, read-only
    /// `.reimage-image.KEY` once sealed; volumes are writable snapshots of them.
    image_volumes: bool,
    /// `DIR/VOLUME` lists the uuids the volume had before its rebuilds, so that snapshots of
    /// earlier content are still its snapshots (a snapshot's parent uuid names the subvolume
    /// it was taken of, which a rebuild replaces).
    lineage: RecordDir,
}

fn hex(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if text.len() != 32 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> std::result::Result<OwnedFd, Errno> {
    let name = CString::new(name).map_err(|_| Errno::INVAL)?;
    rustix::fs::openat(
        dir,
        name.as_c_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

impl BtrfsDriver {
    /// Opens the pool directory, which must be on btrfs; with `quota`, enables quotas on the
    /// filesystem if they are off.
    pub fn open(path: &Path, quota: bool, image_volumes: bool, lineage: RecordDir) -> Result<Self> {
        let pool = PoolDir::open(path)?;
        let fs = rustix::fs::fstatfs(&pool.fd)
            .map_err(|e| Error::errno(format!("statfs {}", path.display()), e))?;
        if fs.f_type as i64 != BTRFS_SUPER_MAGIC {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "pool path {} is not on a btrfs filesystem; use the dir driver there",
                    path.display()
                ),
            ));
        }
        if quota {
            ioctl::quota_enable(pool.fd.as_fd())
                .map_err(|e| Error::errno("enabling btrfs quotas", e))?;
        }
        Ok(BtrfsDriver {
            pool,
            quota,
            image_volumes,
            lineage,
        })
    }

    /// The uuids the volume had before (hex), oldest first.
    fn lineage_of(&self, volume: &VolumeName) -> Vec<[u8; 16]> {
        let bytes = self.lineage.read(volume.as_str()).ok().flatten();
        let text = String::from_utf8_lossy(bytes.as_deref().unwrap_or_default());
        text.lines().filter_map(unhex).collect()
    }

    /// Adds the uuid of the live volume to its lineage before it is swapped out, keeping only
    /// uuids that still have snapshots. Written durably: the swap follows.
    fn remember_live(&self, volume: &VolumeName) -> Result<()> {
        let Some(info) = self.info(Slot::live(volume))? else {
            return Ok(());
        };
        let mut uuids = self.lineage_of(volume);
        uuids.push(info.uuid);
        let mut keep = Vec::new();
        for uuid in uuids {
            if !keep.contains(&uuid) && !self.snapshot_ids(&uuid)?.is_empty() {
                keep.push(uuid);
            }
        }
        if keep.is_empty() {
            return self
                .lineage
                .remove(volume.as_str())
                .map(drop)
                .map_err(|e| Error::io("clearing the snapshot lineage", e));
        }
        let text: String = keep.iter().map(|u| format!("{}\n", hex(u))).collect();
        self.lineage
            .replace(volume.as_str(), text.as_bytes(), true)
            .map_err(|e| {
                let file = self.lineage.path().join(volume.as_str());
                Error::io(format!("writing {}", file.display()), e)
            })
    }

    /// Ids of the snapshots of the volume in `slot`: of its current content and of the
    /// content it had before rebuilds.
    fn snapshots_of_slot(&self, slot: Slot<'_>, info: &ioctl::SubvolInfo) -> Result<Vec<u64>> {
        let mut ids = self.snapshot_ids(&info.uuid)?;
        for uuid in self.lineage_of(slot.volume) {
            for id in self.snapshot_ids(&uuid)? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// The open subvolume in `slot`, or `None` when the slot is empty. A directory there that
    /// is not a subvolume root is an error: the driver only manages what it created.
    fn subvol(&self, slot: Slot<'_>) -> Result<Option<OwnedFd>> {
        let Some(st) = self.pool.stat(slot)? else {
            return Ok(None);
        };
        if st.st_ino != SUBVOL_ROOT_INO {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "{} is a directory but not a btrfs subvolume; move it away by hand",
                    self.pool.path_of(slot).display()
                ),
            ));
        }
        let fd =
            open_dir(self.pool.fd.as_fd(), PoolDir::physical(slot).as_bytes()).map_err(|e| {
                Error::errno(format!("opening {}", self.pool.path_of(slot).display()), e)
            })?;
        Ok(Some(fd))
    }

    /// The subvolume named `name` in the pool directory, or `None` when there is none.
    fn subvol_named(&self, name: &str) -> Result<Option<OwnedFd>> {
        match open_dir(self.pool.fd.as_fd(), name.as_bytes()) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(Error::errno(
                format!("opening {}", self.pool.path.join(name).display()),
                e,
            )),
        }
    }

    /// Deletes the subvolume `fd` is the root of, and every subvolume inside it, read-only
    /// or not.
    fn destroy_subvol(&self, fd: OwnedFd, info: &ioctl::SubvolInfo, shown: &str) -> Result<()> {
        if info.flags & ioctl::SUBVOL_RDONLY != 0 {
            ioctl::set_subvol_flags(fd.as_fd(), info.flags & !ioctl::SUBVOL_RDONLY)
                .map_err(|e| Error::errno(format!("making {shown} writable"), e))?;
        }
        self.destroy_children(fd.as_fd(), shown)?;
        drop(fd);
        ioctl::subvol_destroy_by_id(self.pool.fd.as_fd(), info.id).map_err(|e| match e {
            Errno::BUSY => Error::new(
                ErrorKind::Busy { holder: None },
                format!("{shown} is mounted somewhere; unmount it first"),
            ),
            e => Error::errno(format!("deleting subvolume {shown}"), e),
        })
    }

    fn info(&self, slot: Slot<'_>) -> Result<Option<ioctl::SubvolInfo>> {
        match self.subvol(slot)? {
            Some(fd) => ioctl::subvol_info(fd.as_fd())
                .map(Some)
                .map_err(|e| Error::errno(format!("subvolume info of {slot}"), e)),
            None => Ok(None),
        }
    }

    /// Deletes every subvolume below the subvolume `fd` is in, deepest first, making each
    /// writable first (a read-only subvolume's entries cannot be removed).
    fn destroy_children(&self, fd: BorrowedFd<'_>, shown: &str) -> Result<()> {
        let fail = |what: &str, e: Errno| {
            Error::errno(format!("deleting the subvolumes inside {shown}: {what}"), e)
        };
        for (treeid, dirid) in ioctl::child_subvols(fd).map_err(|e| fail("listing", e))? {
            let (dir_path, name) =
                ioctl::ino_lookup_user(fd, dirid, treeid).map_err(|e| fail("lookup", e))?;
            let mut child_path = dir_path.clone();
            child_path.extend_from_slice(&name);
            let child = open_dir(fd, &child_path).map_err(|e| fail("open", e))?;
            let flags = ioctl::subvol_flags(child.as_fd()).map_err(|e| fail("flags", e))?;
            if flags & ioctl::SUBVOL_RDONLY != 0 {
                ioctl::set_subvol_flags(child.as_fd(), flags & !ioctl::SUBVOL_RDONLY)
                    .map_err(|e| fail("make writable", e))?;
            }
            self.destroy_children(
                child.as_fd(),
                &format!("{shown}/{}", String::from_utf8_lossy(&child_path)),
            )?;
            ioctl::subvol_destroy_by_id(self.pool.fd.as_fd(), treeid)
                .map_err(|e| fail("delete", e))?;
        }
        Ok(())
    }

    fn snapshot_ids(&self, uuid: &[u8; 16]) -> Result<Vec<u64>> {
        ioctl::snapshots_of(self.pool.fd.as_fd(), uuid)
            .map_err(|e| Error::errno("searching for snapshots", e))
    }
}

impl Driver for BtrfsDriver {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshots: true,
            // Snapshots are subvolumes of their own: they outlive the volume they came from.
            keep_snapshots: KeepSnapshots::Independent,
            size_counts_snapshots: false,
            limit_reads_as_full: false,
            size_model: if self.quota {
                SizeModel::Quota
            } else {
                SizeModel::Unlimited
            },
            shrink: self.quota,
            exchange: true,
            cheap_usage: self.quota,
            image_volumes: self.image_volumes,
            templates: true,
            late_limit: true,
            size_counts_image: true,
            full_at_size: false,
        }
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        Ok(self.info(slot)?.map(|i| hex(&i.uuid)))
    }

    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()> {
        ioctl::subvol_create(self.pool.fd.as_fd(), &PoolDir::cname(slot)).map_err(|e| match e {
            Errno::EXIST => Error::new(ErrorKind::AlreadyExists, format!("{slot} already exists")),
            e => Error::errno(
                format!("creating subvolume {}", self.pool.path_of(slot).display()),
                e,
            ),
        })?;
        if let (true, Some(bytes)) = (self.quota, size) {
            self.set_size(slot, bytes)?;
        }
        Ok(())
    }

    fn destroy(&self, slot: Slot<'_>, with_snapshots: bool) -> Result<()> {
        let Some(fd) = self.subvol(slot)? else {
            return Ok(());
        };
        let info = ioctl::subvol_info(fd.as_fd())
            .map_err(|e| Error::errno(format!("subvolume info of {slot}"), e))?;
        if with_snapshots {
            for id in self.snapshots_of_slot(slot, &info)? {
                ioctl::subvol_destroy_by_id(self.pool.fd.as_fd(), id)
                    .map_err(|e| Error::errno(format!("deleting snapshot {id} of {slot}"), e))?;
            }
        }
        self.destroy_subvol(fd, &info, &self.pool.path_of(slot).display().to_string())
    }

    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        let info = self
            .info(slot)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} does not exist")))?;
        let mut names = Vec::new();
        for id in self.snapshots_of_slot(slot, &info)? {
            // A snapshot deleted meanwhile has lost its name: it is not one any more.
            if let Some(name) = ioctl::subvol_name(self.pool.fd.as_fd(), id)
                .map_err(|e| Error::errno("naming a snapshot", e))?
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        if from.kind == SlotKind::Live {
            self.remember_live(from.volume)?;
        }
        self.pool.rename(from, to)
    }

    fn exchange(&self, a: Slot<'_>, b: Slot<'_>) -> Result<()> {
        for slot in [a, b] {
            if slot.kind == SlotKind::Live {
                self.remember_live(slot.volume)?;
            }
        }
        self.pool.exchange(a, b)
    }

    fn forget(&self, volume: &VolumeName) -> Result<()> {
        self.lineage
            .remove(volume.as_str())
            .map(drop)
            .map_err(|e| Error::io("forgetting the snapshot lineage", e))
    }

    fn usage(&self, slot: Slot<'_>) -> Result<Usage> {
        let fd = self
            .subvol(slot)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} does not exist")))?;
        if self.quota {
            let info = ioctl::subvol_info(fd.as_fd())
                .map_err(|e| Error::errno(format!("subvolume info of {slot}"), e))?;
            if let Some((referenced, limit)) = ioctl::qgroup_usage(fd.as_fd(), info.id)
                .map_err(|e| Error::errno(format!("qgroup of {slot}"), e))?
            {
                return Ok(Usage {
                    size: limit,
                    used: referenced,
                    inodes: None,
                });
            }
        }
        let (used, inodes) = tree::usage(fd.as_fd())?;
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
                format!("{slot}: this btrfs pool has no quotas (set quota = true in its config)"),
            ));
        }
        let info = self
            .info(slot)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} does not exist")))?;
        ioctl::qgroup_limit(self.pool.fd.as_fd(), info.id, Some(bytes))
            .map_err(|e| Error::errno(format!("setting the qgroup limit of {slot}"), e))
    }

    fn pool_space(&self) -> Result<PoolSpace> {
        let (available, total) = ioctl::space(self.pool.fd.as_fd())
            .map_err(|e| Error::errno("reading btrfs space figures", e))?;
        Ok(PoolSpace {
            available,
            total,
            inodes_available: None,
            provisioned: None,
        })
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
        let name = image_name(key, false);
        let cname = CString::new(name.as_str())
            .map_err(|_| Error::new(ErrorKind::Failed, "an image key holds a NUL"))?;
        ioctl::subvol_create(self.pool.fd.as_fd(), &cname).map_err(|e| match e {
            Errno::EXIST => Error::new(
                ErrorKind::AlreadyExists,
                format!("unsealed image volume {key} already exists"),
            ),
            e => Error::errno(
                format!(
                    "creating subvolume {}",
                    self.pool.path.join(&name).display()
                ),
                e,
            ),
        })
    }

    fn open_image(&self, key: &ImageKey) -> Result<Mounted> {
        self.subvol_named(&image_name(key, false))?
            .map(Mounted::unmanaged)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("unsealed image volume {key} does not exist"),
                )
            })
    }

    fn seal_image(&self, building: &ImageKey, key: &ImageKey) -> Result<()> {
        let (unsealed, sealed) = (image_name(building, false), image_name(key, true));
        let fd = self.subvol_named(&unsealed)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("unsealed image volume {building} does not exist"),
            )
        })?;
        let flags = ioctl::subvol_flags(fd.as_fd())
            .map_err(|e| Error::errno(format!("flags of image volume {key}"), e))?;
        ioctl::set_subvol_flags(fd.as_fd(), flags | ioctl::SUBVOL_RDONLY)
            .map_err(|e| Error::errno(format!("making image volume {key} read-only"), e))?;
        // The rename is the seal: under the unsealed name it is still a leftover.
        rustix::fs::renameat_with(
            &self.pool.fd,
            unsealed.as_str(),
            &self.pool.fd,
            sealed.as_str(),
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| Error::errno(format!("sealing image volume {key}"), e))
    }

    fn clone_snapshot(&self, template: &VolumeName, snapshot: &str, slot: Slot<'_>) -> Result<()> {
        let live = Slot::live(template);
        let info = self.info(live)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("template volume {template} does not exist"),
            )
        })?;
        let mut found = None;
        for id in self.snapshots_of_slot(live, &info)? {
            let name = ioctl::subvol_name(self.pool.fd.as_fd(), id)
                .map_err(|e| Error::errno("naming a snapshot", e))?;
            if name.as_deref() == Some(snapshot) {
                found = Some(id);
                break;
            }
        }
        let id = found.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("volume {template} has no snapshot {snapshot}"),
            )
        })?;
        let source = ioctl::open_subvol(self.pool.fd.as_fd(), id).map_err(|e| {
            Error::errno(
                format!("opening snapshot {snapshot} of volume {template}"),
                e,
            )
        })?;
        ioctl::snapshot_create(source.as_fd(), self.pool.fd.as_fd(), &PoolDir::cname(slot)).map_err(
            |e| match e {
                Errno::EXIST => {
                    Error::new(ErrorKind::AlreadyExists, format!("{slot} already exists"))
                }
                e => Error::errno(
                    format!("cloning snapshot {snapshot} of volume {template} into {slot}"),
                    e,
                ),
            },
        )
    }

    fn clone_image(&self, key: &ImageKey, slot: Slot<'_>) -> Result<Cloned> {
        let source = self.subvol_named(&image_name(key, true))?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("image volume {key} does not exist"),
            )
        })?;
        ioctl::snapshot_create(source.as_fd(), self.pool.fd.as_fd(), &PoolDir::cname(slot))
            .map_err(|e| match e {
                Errno::EXIST => {
                    Error::new(ErrorKind::AlreadyExists, format!("{slot} already exists"))
                }
                e => Error::errno(format!("cloning image volume {key} into {slot}"), e),
            })?;
        Ok(Cloned::Whole)
    }

    fn images(&self) -> Result<Vec<ImageVolume>> {
        let mut found = Vec::new();
        for name in self.pool.names()? {
            let Some((key, sealed)) = parse_image_name(&name) else {
                continue;
            };
            let Some(fd) = self.subvol_named(&name)? else {
                continue; // removed meanwhile
            };
            let info = ioctl::subvol_info(fd.as_fd())
                .map_err(|e| Error::errno(format!("subvolume info of image volume {key}"), e))?;
            let mut clones = Vec::new();
            for id in self.snapshot_ids(&info.uuid)? {
                let Some(clone) = ioctl::subvol_name(self.pool.fd.as_fd(), id)
                    .map_err(|e| Error::errno("naming a clone of an image volume", e))?
                else {
                    continue;
                };
                // A volume, or the temporary slot of one being built or cleaned up.
                let volume = match temporary_slot(&clone) {
                    Some((volume, _)) => volume.as_str().to_owned(),
                    None => clone,
                };
                if !clones.contains(&volume) {
                    clones.push(volume);
                }
            }
            clones.sort();
            found.push(ImageVolume {
                key,
                sealed,
                clones,
                holders: Vec::new(),
            });
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn destroy_image(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        let name = image_name(key, sealed);
        let Some(fd) = self.subvol_named(&name)? else {
            return Ok(());
        };
        let info = ioctl::subvol_info(fd.as_fd())
            .map_err(|e| Error::errno(format!("subvolume info of image volume {key}"), e))?;
        self.destroy_subvol(fd, &info, &self.pool.path.join(&name).display().to_string())
    }
}
