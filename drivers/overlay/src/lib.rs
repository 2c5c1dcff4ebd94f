//! The `overlay` driver: a volume is a writable overlayfs upper layer over a shared,
//! read-only image volume.
//!
//! The pool is one directory ([`PoolDir`]'s naming, renames and swaps). A volume's slot is a
//! directory holding `upper/` and `work/` (the overlay's upper and work directories) and
//! `lower`, a one-line record of its lower layer: `image KEY` (the image volume
//! `.reimage-image.KEY` beside it) or `empty` (the pool's empty directory `.reimage-empty`).
//! Swapping two slots swaps the whole (upper, lower) pair in one `renameat2`, so a rebuild
//! from the same image resets the delta and one from another image re-bases it, atomically.
//!
//! Image volumes are plain directory trees, unpacked once, sealed by a rename and never
//! written again: every volume that uses one shares it, no copy is made. Unlike a clone on
//! btrfs or zfs, a volume depends on its image volume for as long as it exists, so an image
//! volume that any slot's `lower` names is never destroyed.
//!
//! reimage reads and writes a volume through a detached overlay mount of its own
//! ([`mount`]); what a manager mounts is [`Driver::mount_spec`]. Sizes: with `quota = true`
//! on a filesystem with project quotas (ext4, xfs) the slot directory is a project (the dir
//! driver's [`project`]), so the limit and usage are the upper layer's.

pub mod mount;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use reimage_driver::image::image_name;
use reimage_driver::pooldir::PoolDir;
use reimage_driver::{
    slot_named, tree, Capabilities, Cloned, Driver, Error, ErrorKind, ImageKey, ImageVolume,
    KeepSnapshots, MountSpec, Mounted, PoolSpace, PoolWarning, Result, SizeModel, Slot, SlotKind,
    Usage, VolumeName,
};
use reimage_driver_dir::project;
use rustix::fs::{Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use mount::Layers;

const UPPER: &str = "upper";
const WORK: &str = "work";
const LOWER_RECORD: &str = "lower";
/// The lower layer of volumes created empty.
const EMPTY_LOWER: &str = ".reimage-empty";
/// A `lower` record is one short line; anything longer is not reimage's.
const MAX_RECORD: usize = 128;

/// A volume's lower layer, as its `lower` record names it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Lower {
    Empty,
    Image(ImageKey),
}

impl Lower {
    fn record(&self) -> String {
        match self {
            Lower::Empty => "empty\n".to_owned(),
            Lower::Image(key) => format!("image {key}\n"),
        }
    }

    fn parse(text: &str) -> Option<Lower> {
        match text.trim_end_matches('\n') {
            "empty" => Some(Lower::Empty),
            line => Some(Lower::Image(ImageKey::parse(line.strip_prefix("image ")?)?)),
        }
    }
}

/// Why `path` cannot be a pool of this driver, or `None`: overlayfs takes its layers as one
/// option string, in which `:`, `,` and `\` separate or escape, and managers pass the mount
/// spec on in `mount -o` and fstab lines, in which whitespace ends a field.
pub fn unusable_path(path: &Path) -> Option<String> {
    let text = path.to_str()?;
    let bad: Vec<char> = text
        .chars()
        .filter(|c| matches!(c, ':' | ',' | '\\' | '=') || c.is_whitespace() || c.is_control())
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "it holds {:?}, which overlayfs mount options cannot carry; choose a path without `:`, `,`, `=`, `\\` or whitespace",
            bad.into_iter().collect::<String>()
        )
    })
}

pub struct OverlayDriver {
    pool: PoolDir,
    /// Project quotas are asked for and the filesystem has them.
    quota: bool,
    /// Asked for but not available, and why.
    quota_unavailable: Option<String>,
    /// The pool is on xfs, whose project quotas fail writes with ENOSPC.
    xfs: bool,
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> std::result::Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

impl OverlayDriver {
    /// Opens the pool directory (see [`PoolDir::open`]); `quota` asks for project quotas.
    pub fn open(path: &Path, quota: bool) -> Result<Self> {
        if let Some(why) = unusable_path(path) {
            return Err(Error::new(
                ErrorKind::Failed,
                format!("pool path {}: {why}", path.display()),
            ));
        }
        let pool = PoolDir::open(path)?;
        let quota_unavailable = quota
            .then(|| project::unsupported(pool.fd.as_fd()))
            .flatten();
        const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
        let xfs = rustix::fs::fstatfs(&pool.fd).is_ok_and(|st| st.f_type == XFS_SUPER_MAGIC);
        Ok(OverlayDriver {
            xfs,
            quota: quota && quota_unavailable.is_none(),
            quota_unavailable,
            pool,
        })
    }

    fn slot_dir(&self, slot: Slot<'_>) -> Result<OwnedFd> {
        open_dir_at(self.pool.fd.as_fd(), &PoolDir::physical(slot)).map_err(|e| match e {
            Errno::NOENT => Error::new(ErrorKind::NotFound, format!("{slot} does not exist")),
            e => Error::errno(format!("opening {}", self.pool.path_of(slot).display()), e),
        })
    }

    /// The slot's lower layer, from its `lower` record.
    fn lower_of(&self, slot: Slot<'_>) -> Result<Lower> {
        let dir = self.slot_dir(slot)?;
        self.lower_in(dir.as_fd(), &self.pool.path_of(slot))
    }

    fn lower_in(&self, dir: BorrowedFd<'_>, shown: &Path) -> Result<Lower> {
        let damaged = |why: String| {
            Error::new(
                ErrorKind::Failed,
                format!(
                    "{}/{LOWER_RECORD}: {why}; the volume's lower layer is unknown (restore the record or delete the volume)",
                    shown.display()
                ),
            )
        };
        let fd = rustix::fs::openat(
            dir,
            LOWER_RECORD,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| damaged(std::io::Error::from(e).to_string()))?;
        let st =
            rustix::fs::fstat(&fd).map_err(|e| damaged(std::io::Error::from(e).to_string()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(damaged("not a regular file".into()));
        }
        let mut buf = vec![0u8; MAX_RECORD + 1];
        let n = rustix::io::read(&fd, &mut buf).map_err(|e| damaged(e.to_string()))?;
        std::str::from_utf8(&buf[..n])
            .ok()
            .filter(|_| n <= MAX_RECORD)
            .and_then(Lower::parse)
            .ok_or_else(|| damaged("not a lower layer record".into()))
    }

    fn lower_path(&self, lower: &Lower) -> PathBuf {
        match lower {
            Lower::Empty => self.pool.path.join(EMPTY_LOWER),
            Lower::Image(key) => self.pool.path.join(image_name(key, true)),
        }
    }

    /// Makes the slot: its directory (a project with limit `size` when the pool has quotas),
    /// the upper and work directories, and the `lower` record. The upper directory takes the
    /// owner, mode and times of `root_of` (the lower layer's root), which the merged root
    /// shows. On failure removes what it made.
    fn make_slot(
        &self,
        slot: Slot<'_>,
        lower: &Lower,
        root_of: BorrowedFd<'_>,
        size: Option<u64>,
    ) -> Result<()> {
        let shown = self.pool.path_of(slot);
        rustix::fs::mkdirat(
            &self.pool.fd,
            PoolDir::cname(slot),
            Mode::from_raw_mode(0o700),
        )
        .map_err(|e| match e {
            Errno::EXIST => Error::new(ErrorKind::AlreadyExists, format!("{slot} already exists")),
            e => Error::errno(format!("creating {}", shown.display()), e),
        })?;
        let made = (|| {
            let dir = self.slot_dir(slot)?;
            let fail =
                |what: &str, e: Errno| Error::errno(format!("{what} in {}", shown.display()), e);
            if self.quota {
                let id = project::assign(dir.as_fd())?;
                project::set_limit(dir.as_fd(), id, size.unwrap_or(0))?;
            }
            rustix::fs::mkdirat(&dir, UPPER, Mode::from_raw_mode(0o755))
                .map_err(|e| fail("creating upper", e))?;
            rustix::fs::mkdirat(&dir, WORK, Mode::from_raw_mode(0o700))
                .map_err(|e| fail("creating work", e))?;
            let upper = open_dir_at(dir.as_fd(), UPPER).map_err(|e| fail("opening upper", e))?;
            let st = rustix::fs::fstat(root_of).map_err(|e| fail("stat of the lower root", e))?;
            rustix::fs::fchown(
                &upper,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
            )
            .map_err(|e| fail("chown upper", e))?;
            rustix::fs::fchmod(&upper, Mode::from_raw_mode(st.st_mode & 0o7777))
                .map_err(|e| fail("chmod upper", e))?;
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime as _,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime as _,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            };
            rustix::fs::futimens(&upper, &times).map_err(|e| fail("times of upper", e))?;
            let record = rustix::fs::openat(
                &dir,
                LOWER_RECORD,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| fail("creating the lower record", e))?;
            let text = lower.record();
            let n = rustix::io::write(&record, text.as_bytes())
                .map_err(|e| fail("writing the lower record", e))?;
            if n != text.len() {
                return Err(fail("writing the lower record", Errno::NOSPC));
            }
            Ok(())
        })();
        if made.is_err() {
            let _ = self.destroy(slot, false);
        }
        made
    }

    /// The pool's empty lower layer, made when first needed.
    fn empty_lower(&self) -> Result<OwnedFd> {
        match rustix::fs::mkdirat(&self.pool.fd, EMPTY_LOWER, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(Error::errno(
                    format!("creating {}", self.pool.path.join(EMPTY_LOWER).display()),
                    e,
                ))
            }
        }
        open_dir_at(self.pool.fd.as_fd(), EMPTY_LOWER).map_err(|e| {
            Error::errno(
                format!("opening {}", self.pool.path.join(EMPTY_LOWER).display()),
                e,
            )
        })
    }

    /// Every slot's lower layer: `(volume, lower)` for each live and temporary slot.
    fn lowers(&self) -> Result<Vec<(String, Lower)>> {
        let mut found = Vec::new();
        for name in self.pool.names()? {
            let Some((volume, _)) = slot_named(&name) else {
                continue;
            };
            let Ok(dir) = open_dir_at(self.pool.fd.as_fd(), &name) else {
                continue; // removed meanwhile, or not a directory: not a volume
            };
            // A slot interrupted before its record was written uses no image volume.
            if let Ok(lower) = self.lower_in(dir.as_fd(), &self.pool.path.join(&name)) {
                found.push((volume.as_str().to_owned(), lower));
            }
        }
        Ok(found)
    }

    /// The volumes whose slots use the image volume `key`, sorted, each once.
    fn users_of(&self, key: &ImageKey) -> Result<Vec<String>> {
        let mut users: Vec<String> = self
            .lowers()?
            .into_iter()
            .filter(|(_, lower)| *lower == Lower::Image(key.clone()))
            .map(|(volume, _)| volume)
            .collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    fn layer_paths(&self, slot: Slot<'_>) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let lower = self.lower_of(slot)?;
        let dir = self.pool.path_of(slot);
        Ok((self.lower_path(&lower), dir.join(UPPER), dir.join(WORK)))
    }

    /// The slot's project, assigned to its tree first if it was made without one.
    fn project(&self, slot: Slot<'_>) -> Result<(OwnedFd, u32)> {
        let dir = self.slot_dir(slot)?;
        let id = if project::is_assigned(dir.as_fd())? {
            project::id_of(dir.as_fd())?
        } else {
            project::assign(dir.as_fd())?
        };
        Ok((dir, id))
    }
}

impl Driver for OverlayDriver {
    fn name(&self) -> &'static str {
        "overlay"
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
            image_volumes: true,
            templates: false,
            late_limit: true,
            // The limit is the upper layer's: the shared image volume is not counted.
            size_counts_image: false,
            full_at_size: false,
        }
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        self.pool.identity(slot)
    }

    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()> {
        let empty = self.empty_lower()?;
        self.make_slot(slot, &Lower::Empty, empty.as_fd(), size)
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
        let dir = self.slot_dir(slot)?;
        if self.quota && project::is_assigned(dir.as_fd())? {
            let id = project::id_of(dir.as_fd())?;
            let (size, used, inodes) = project::usage(dir.as_fd(), id)?;
            return Ok(Usage {
                size,
                used,
                inodes: Some(inodes),
            });
        }
        let upper = open_dir_at(dir.as_fd(), UPPER).map_err(|e| {
            Error::errno(
                format!("opening {}", self.pool.path_of(slot).join(UPPER).display()),
                e,
            )
        })?;
        let (used, inodes) = tree::usage(upper.as_fd())?;
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
                format!("{slot}: the overlay driver has no size limits on this pool"),
            ));
        }
        let (dir, id) = self.project(slot)?;
        project::set_limit(dir.as_fd(), id, bytes)
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

    /// The merged view of the slot. The slot being built is mounted writable (what is
    /// written lands in its upper layer); any other is mounted read-only, its upper layer
    /// as the top lower layer, so that its whiteouts and opaque directories count and its
    /// work directory is not touched.
    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        let (lower, upper, work) = self.layer_paths(slot)?;
        let layers = if slot.kind == SlotKind::New {
            Layers {
                lower: vec![&lower],
                upper: Some((&upper, &work)),
            }
        } else {
            Layers {
                lower: vec![&upper, &lower],
                upper: None,
            }
        };
        mount::mount(&layers, &slot.to_string())
    }

    /// A process or mount inside the slot, or an overlay mounted anywhere over its upper
    /// layer. The two are separate scans of /proc, run side by side.
    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        let upper = self.pool.path_of(slot).join(UPPER);
        let (inside, overlay) = std::thread::scope(|scope| {
            let overlay = scope.spawn(|| reimage_driver::overlay_using(&upper));
            let inside = self.pool.busy(slot);
            let overlay = overlay
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the overlay scan panicked")));
            (inside, overlay)
        });
        if let Some(holder) = inside? {
            return Ok(Some(holder));
        }
        overlay.map_err(|e| Error::io("reading mountinfo", e))
    }

    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        self.pool.leftovers()
    }

    fn mount_spec(&self, slot: Slot<'_>) -> Result<Option<MountSpec>> {
        let (lower, upper, work) = self.layer_paths(slot)?;
        let text = |p: PathBuf| p.to_string_lossy().into_owned();
        Ok(Some(MountSpec {
            fstype: "overlay",
            options: vec![
                ("lowerdir", text(lower)),
                ("upperdir", text(upper)),
                ("workdir", text(work)),
            ],
        }))
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

    fn clone_image(&self, key: &ImageKey, slot: Slot<'_>) -> Result<Cloned> {
        let image = self.pool.require_image_dir(key, true)?;
        self.make_slot(slot, &Lower::Image(key.clone()), image.as_fd(), None)?;
        Ok(Cloned::Whole)
    }

    fn images(&self) -> Result<Vec<ImageVolume>> {
        let lowers = self.lowers()?;
        let mut found = Vec::new();
        for (key, sealed) in self.pool.image_dirs()? {
            let mut clones: Vec<String> = lowers
                .iter()
                .filter(|(_, lower)| sealed && *lower == Lower::Image(key.clone()))
                .map(|(volume, _)| volume.clone())
                .collect();
            clones.sort();
            clones.dedup();
            found.push(ImageVolume {
                key,
                sealed,
                clones,
                holders: Vec::new(),
            });
        }
        Ok(found)
    }

    /// Refuses (`HasClones`) while any slot uses the sealed image volume, and (`Busy`) while
    /// an overlay mounted anywhere has it as a layer: they would lose their lower layer.
    fn destroy_image(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        if sealed {
            let users = self.users_of(key)?;
            if !users.is_empty() {
                return Err(Error::new(
                    ErrorKind::HasClones(users.clone()),
                    format!(
                        "image volume {key} is the lower layer of {}; delete or rebuild them first",
                        users.join(", ")
                    ),
                ));
            }
        }
        let name = image_name(key, sealed);
        // Mounted by hand as somebody's lower layer: not removed from under that mount.
        if let Some(holder) = reimage_driver::overlay_using(&self.pool.path.join(&name))
            .map_err(|e| Error::io("reading mountinfo", e))?
        {
            return Err(Error::new(
                ErrorKind::Busy {
                    holder: Some(holder.clone()),
                },
                format!("image volume {key} is in use ({holder})"),
            ));
        }
        self.pool.remove_image_dir(key, sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_records_round_trip() {
        let key = ImageKey::parse(&"ab".repeat(32)).unwrap();
        for lower in [Lower::Empty, Lower::Image(key)] {
            assert_eq!(Lower::parse(&lower.record()), Some(lower));
        }
        for bad in ["", "image", "image ../x", "empty\nimage", "Empty"] {
            assert_eq!(Lower::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_that_overlay_options_cannot_carry_are_refused() {
        assert!(unusable_path(Path::new("/srv/reimage/overlay")).is_none());
        for bad in ["/a:b", "/a,b", "/a b", "/a\\b", "/a=b", "/a\nb"] {
            assert!(unusable_path(Path::new(bad)).is_some(), "{bad}");
        }
    }
}
