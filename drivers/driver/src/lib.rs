//! The storage-driver contract of reimage.
//!
//! The core never names a backend object directly. It speaks of *slots*: the live volume and
//! the temporary volumes it builds beside it ([`SlotKind`]). Each driver maps a slot to its own
//! physical name (a directory, a subvolume, a dataset, a logical volume) so that no volume name
//! can ever collide with a temporary one, whatever the backend's naming rules are.
//!
//! Every method is one step that either happens or does not: the core's journal records which
//! step it is about to take, and crash recovery only needs [`Driver::identity`] to find out
//! where an interrupted operation stopped.

mod busy;
pub mod command;
#[cfg(feature = "testing")]
pub mod fake;
pub mod image;
mod image_dir;
pub mod mount;
mod name;
pub mod pooldir;
pub mod records;
pub mod tree;
pub mod walk;

use std::fmt;
use std::os::fd::OwnedFd;

pub use busy::{
    find_holder, find_holder_on_device, holder_of_mount, holder_of_mount_below, mounts,
    overlay_using, MountEntry,
};
pub use image::{ImageKey, ImageVolume};
pub use name::{NameError, VolumeName};

/// Which of a volume's slots an operation addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotKind {
    /// The volume under its own name: what users see.
    Live,
    /// The volume being built; it becomes `Live` when complete.
    New,
    /// The previous content while it waits to be destroyed.
    Old,
}

impl SlotKind {
    pub const ALL: [SlotKind; 3] = [SlotKind::Live, SlotKind::New, SlotKind::Old];

    pub fn as_str(self) -> &'static str {
        match self {
            SlotKind::Live => "live",
            SlotKind::New => "new",
            SlotKind::Old => "old",
        }
    }
}

/// One slot of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot<'a> {
    pub volume: &'a VolumeName,
    pub kind: SlotKind,
}

impl<'a> Slot<'a> {
    pub fn live(volume: &'a VolumeName) -> Self {
        Slot {
            volume,
            kind: SlotKind::Live,
        }
    }
    /// The slot the volume's next content is built in.
    pub fn building(volume: &'a VolumeName) -> Self {
        Slot {
            volume,
            kind: SlotKind::New,
        }
    }
    pub fn old(volume: &'a VolumeName) -> Self {
        Slot {
            volume,
            kind: SlotKind::Old,
        }
    }
}

/// Prefixes of the temporary slots' names, for drivers that name slots in one namespace
/// (directories, datasets). Volume names start with a letter or digit, so they never collide.
const NEW_PREFIX: &str = ".reimage-new.";
const OLD_PREFIX: &str = ".reimage-old.";

impl Slot<'_> {
    /// The slot's name beside the others: `VOLUME`, `.reimage-new.VOLUME`, `.reimage-old.VOLUME`.
    pub fn physical_name(&self) -> String {
        match self.kind {
            SlotKind::Live => self.volume.as_str().to_owned(),
            SlotKind::New => format!("{NEW_PREFIX}{}", self.volume),
            SlotKind::Old => format!("{OLD_PREFIX}{}", self.volume),
        }
    }
}

/// The volume and kind of a temporary slot named by [`Slot::physical_name`]; `None` for a
/// live volume's name or anything else.
pub fn temporary_slot(name: &str) -> Option<(VolumeName, SlotKind)> {
    [(NEW_PREFIX, SlotKind::New), (OLD_PREFIX, SlotKind::Old)]
        .into_iter()
        .find_map(|(prefix, kind)| {
            let volume = VolumeName::parse(name.strip_prefix(prefix)?).ok()?;
            Some((volume, kind))
        })
}

/// The slot named by [`Slot::physical_name`]: a temporary slot, or a live volume; `None`
/// for anything else (an image volume, a record).
pub fn slot_named(name: &str) -> Option<(VolumeName, SlotKind)> {
    temporary_slot(name).or_else(|| Some((VolumeName::parse(name).ok()?, SlotKind::Live)))
}

impl fmt::Display for Slot<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SlotKind::Live => write!(f, "volume {}", self.volume),
            kind => write!(f, "{} slot of volume {}", kind.as_str(), self.volume),
        }
    }
}

/// How a driver bounds the size of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeModel {
    /// No limit at all (a plain directory without project quotas): `size` is only advisory.
    Unlimited,
    /// A limit on the bytes the volume may reference; space is taken only as data is written.
    Quota,
    /// A block device of fixed size: the whole size is taken from the pool when created.
    Allocated,
}

/// How a rebuild with `snapshots: keep` keeps a volume's snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepSnapshots {
    /// It cannot: the snapshots die with the volume (or there are none).
    No,
    /// Snapshots outlive the volume they were taken of (btrfs): the usual atomic rebuild
    /// keeps them, and the driver keeps listing them as the volume's.
    Independent,
    /// Snapshots live inside the volume (zfs): the volume is refilled in place, guarded by a
    /// snapshot of its own that a failure or crash rolls back to ([`Driver::set_guard`]).
    Refill,
}

/// A condition of a pool that a driver reports at the start of every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolWarning {
    /// The pool asks for quotas that its filesystem cannot enforce.
    QuotaUnavailable,
}

/// What a driver can do; the core and the conformance suite read it instead of guessing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend has snapshots of volumes at all.
    pub snapshots: bool,
    /// Whether and how a rebuild leaves existing snapshots intact and restorable.
    pub keep_snapshots: KeepSnapshots,
    /// The size limit counts the space the volume's snapshots hold (a zfs `quota`).
    pub size_counts_snapshots: bool,
    /// An exhausted limit shows as ENOSPC rather than EDQUOT (xfs project quotas); the core
    /// tells the two apart by the pool's own free space.
    pub limit_reads_as_full: bool,
    pub size_model: SizeModel,
    /// A volume's size or quota can be made smaller.
    pub shrink: bool,
    /// [`Driver::exchange`] swaps two slots atomically; otherwise the core uses two renames.
    pub exchange: bool,
    /// [`Driver::usage`] is a lookup (a quota or device size), not a walk of the whole tree;
    /// results of create and rebuild include usage only then (`inspect` always does).
    pub cheap_usage: bool,
    /// The pool keeps image volumes and fills volumes by cloning them
    /// ([`Driver::create_image`] and the methods after it).
    pub image_volumes: bool,
    /// A volume can be filled as a writable clone of another volume's snapshot
    /// ([`Driver::clone_snapshot`]).
    pub templates: bool,
    /// The limit can be set after the volume is filled, while it is open, at no cost (a
    /// quota; not a device's size): a first fill may then be measured while it unpacks.
    pub late_limit: bool,
    /// The size limit counts the image content the volume was filled with (every driver
    /// but overlay, whose limit is its upper layer's: the lower image volume is shared and
    /// counted nowhere).
    pub size_counts_image: bool,
    /// A volume at its size is full (its size is its filesystem's, lvm): what does not fit
    /// is `insufficient_space`, not `quota_exceeded`.
    pub full_at_size: bool,
}

/// What [`Driver::clone_image`] made.
pub enum Cloned {
    /// The slot holds the image volume's content: the backend cloned or copied it whole.
    Whole,
    /// The slot is an empty volume, and this is the sealed image volume's root: the core
    /// copies its tree into the slot, every file a reflink of the image volume's (a dir pool:
    /// the filesystem shares file extents but clones no trees).
    CopyFrom(Mounted),
}

/// Size and usage of one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Quota or device size in bytes; `None` when the volume has no limit.
    pub size: Option<u64>,
    /// Bytes the volume takes from the pool.
    pub used: u64,
    /// Number of inodes in the volume, where the backend can tell cheaply.
    pub inodes: Option<u64>,
}

/// Space of the pool as a whole, from the backend's own accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSpace {
    /// Bytes that new data can still take.
    pub available: u64,
    pub total: u64,
    /// Inodes that can still be created, where the filesystem has a fixed number of them
    /// (`None` for filesystems that allocate inodes dynamically, like btrfs).
    pub inodes_available: Option<u64>,
    /// For pools that overcommit (LVM thin): the sum of the sizes already promised to
    /// volumes, which may exceed `total`.
    pub provisioned: Option<u64>,
}

/// The root directory of a volume, opened (and mounted, for block-backed drivers) for filling.
/// Dropping it releases the mount, best effort; [`Mounted::release`] reports failures.
pub struct Mounted {
    root: Option<OwnedFd>,
    release: Option<Box<dyn FnOnce() -> Result<()>>>,
}

impl Mounted {
    /// A root that needs no release: the directory is always reachable.
    pub fn unmanaged(root: OwnedFd) -> Self {
        Mounted {
            root: Some(root),
            release: None,
        }
    }

    /// A root whose `release` must run once the caller is done (an unmount).
    pub fn with_release(root: OwnedFd, release: Box<dyn FnOnce() -> Result<()>>) -> Self {
        Mounted {
            root: Some(root),
            release: Some(release),
        }
    }

    pub fn root(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match &self.root {
            Some(fd) => fd.as_fd(),
            None => unreachable!("the root fd lives until release"),
        }
    }

    /// Closes the root and runs the release step (unmount), reporting its failure.
    pub fn release(mut self) -> Result<()> {
        self.root.take();
        match self.release.take() {
            Some(release) => release(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.root.take();
        if let Some(release) = self.release.take() {
            let _ = release();
        }
    }
}

/// What a manager mounts to use a volume whose content is not one directory or device of
/// its own (an overlay's layers): the filesystem type and its options, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: &'static str,
    pub options: Vec<(&'static str, String)>,
}

/// The reason a driver step failed, in terms the core maps onto protocol error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    /// The volume is in use; `holder` names the process or mount when it could be found.
    Busy {
        holder: Option<String>,
    },
    /// The volume has snapshots and the step would destroy them.
    HasSnapshots(Vec<String>),
    /// Other volumes were cloned from the volume's snapshots; it cannot be destroyed before
    /// they are promoted or destroyed.
    HasClones(Vec<String>),
    NoSpace,
    QuotaExceeded,
    /// The backend cannot do this at all (not a transient failure).
    Unsupported,
    /// Anything else: a failed system call or command.
    Failed,
}

/// A failed driver step: what kind of failure and a message that names the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// A failed system call: ENOSPC and EDQUOT keep their meaning, everything else is `Failed`.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Self {
        use rustix::io::Errno;
        let kind = match err.raw_os_error().map(Errno::from_raw_os_error) {
            Some(Errno::NOSPC) => ErrorKind::NoSpace,
            Some(Errno::DQUOT) => ErrorKind::QuotaExceeded,
            Some(Errno::NOENT) => ErrorKind::NotFound,
            Some(Errno::EXIST) => ErrorKind::AlreadyExists,
            Some(Errno::BUSY) => ErrorKind::Busy { holder: None },
            _ => ErrorKind::Failed,
        };
        Error::new(kind, format!("{context}: {err}"))
    }

    pub fn errno(context: impl fmt::Display, err: rustix::io::Errno) -> Self {
        Error::io(context, err.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// One storage backend. Implementations are driven by the core from a single thread, one
/// volume at a time under the core's per-volume lock; they keep no state between calls that
/// a crash could lose.
pub trait Driver {
    /// The driver's name as written in argv and in the pool config.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// A stable identity of the object in `slot` that survives renames (inode, subvolume
    /// uuid, dataset guid, LV uuid), or `None` when the slot is empty. Recovery compares it
    /// with the identity recorded in the journal to see whether a swap happened.
    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>>;

    /// The identities of the volume's three slots, `[live, new, old]`. Drivers whose every
    /// look costs a program run answer with one.
    fn identities(&self, volume: &VolumeName) -> Result<[Option<String>; 3]> {
        Ok([
            self.identity(Slot::live(volume))?,
            self.identity(Slot::building(volume))?,
            self.identity(Slot::old(volume))?,
        ])
    }

    /// Creates an empty volume in `slot` (which must be empty), sized when the driver has
    /// sizes. Fails with `AlreadyExists` if the slot is taken.
    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()>;

    /// Destroys the volume in `slot` and, with `with_snapshots`, its snapshots. Without it,
    /// snapshots that can outlive their volume (btrfs) stay, and a backend where they cannot
    /// fails with `HasSnapshots`. An empty slot is not an error.
    fn destroy(&self, slot: Slot<'_>, with_snapshots: bool) -> Result<()>;

    /// Names of the snapshots of the volume in `slot`, oldest first.
    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>>;

    /// Moves the volume in `from` to the empty slot `to`, atomically.
    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()>;

    /// Swaps the volumes in two slots atomically; `Unsupported` unless
    /// [`Capabilities::exchange`].
    fn exchange(&self, a: Slot<'_>, b: Slot<'_>) -> Result<()>;

    fn usage(&self, slot: Slot<'_>) -> Result<Usage>;

    /// Sets the quota or device size of the volume in `slot`. For a driver that refills
    /// ([`KeepSnapshots::Refill`]), `0` removes the limit (restoring a volume that had none).
    fn set_size(&self, slot: Slot<'_>, bytes: u64) -> Result<()>;

    fn pool_space(&self) -> Result<PoolSpace>;

    /// Opens the root directory of the volume in `slot`, mounting it first where needed.
    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted>;

    /// What else than the driver decides the tree an image unpacks to in this pool (the
    /// filesystem an lvm pool makes): part of every image volume's key, so that a pool whose
    /// config changes it never clones an image volume made the other way. Empty for none.
    fn image_variant(&self) -> &'static str {
        ""
    }

    /// Bytes a volume's filesystem keeps for itself beside `content` bytes of files (an xfs
    /// log), where the volume is a filesystem of its own size; the plan adds them to the
    /// size it gives a volume.
    fn fs_overhead(&self, _content: u64) -> u64 {
        0
    }

    /// Names a process or mount that keeps the volume in `slot` busy, if any.
    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>>;

    /// Conditions of the pool the caller should know about (code, message), reported as
    /// warnings at the start of every request: a quota the config asks for but the
    /// filesystem cannot enforce.
    fn warnings(&self) -> Vec<(PoolWarning, String)> {
        Vec::new()
    }

    /// Volumes cloned from the snapshots of the volume in `slot`: while there are any, it
    /// cannot be destroyed.
    fn clones(&self, _slot: Slot<'_>) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// [`KeepSnapshots::Refill`]: takes the guard snapshot of the volume in `slot`, the state
    /// a failed or interrupted refill returns to. Taking it again when it exists is an error.
    fn set_guard(&self, _slot: Slot<'_>) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this driver has no guard snapshots",
        ))
    }

    /// Whether the volume in `slot` has a guard snapshot.
    fn has_guard(&self, _slot: Slot<'_>) -> Result<bool> {
        Ok(false)
    }

    /// Returns the volume in `slot` to its guard snapshot and removes the guard; without a
    /// guard it does nothing.
    fn roll_back_to_guard(&self, _slot: Slot<'_>) -> Result<()> {
        Ok(())
    }

    /// Removes the guard snapshot (the refill succeeded); without a guard it does nothing.
    fn drop_guard(&self, _slot: Slot<'_>) -> Result<()> {
        Ok(())
    }

    /// Opens the guard snapshot's root read-only (to copy `preserve` paths from).
    fn open_guard(&self, _slot: Slot<'_>) -> Result<Mounted> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this driver has no guard snapshots",
        ))
    }

    /// Flushes the volume in `slot` to stable storage. `root` is its open root directory.
    fn sync(&self, _slot: Slot<'_>, root: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        rustix::fs::syncfs(root).map_err(|e| Error::errno("syncfs", e))
    }

    /// The volume is gone for good (deleted): forget anything kept about it, such as the
    /// lineage that ties old snapshots to it.
    fn forget(&self, _volume: &VolumeName) -> Result<()> {
        Ok(())
    }

    /// Volumes that have something in a temporary slot (`New` or `Old`): the leftovers of an
    /// interrupted operation, for `recover` without a volume name.
    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>>;

    /// What a manager mounts to use the volume in `slot`, where that is not the volume's own
    /// path, dataset or device (an overlay's layers); `None` otherwise.
    fn mount_spec(&self, _slot: Slot<'_>) -> Result<Option<MountSpec>> {
        Ok(None)
    }

    /// [`Capabilities::image_volumes`]: creates the empty, writable, unsealed image volume
    /// `key`. Fails with `AlreadyExists` if an unsealed one is there. `size`: the bytes the
    /// image needs with headroom, when it was measured first; a driver whose volumes have a
    /// fixed size (an LV's filesystem) needs it and has no [`Capabilities::late_limit`], so
    /// its image volumes are never built before the image is measured.
    fn create_image(&self, _key: &ImageKey, _size: Option<u64>) -> Result<()> {
        Err(no_image_volumes())
    }

    /// Opens the root of the unsealed image volume `key`, for filling.
    fn open_image(&self, _key: &ImageKey) -> Result<Mounted> {
        Err(no_image_volumes())
    }

    /// Seals the unsealed image volume `unsealed` as the image volume `key`: read-only and
    /// under its final name, in one step that either happens or does not, never over an
    /// existing one. The two keys differ where the build began before the image's key was
    /// known (it was built under a provisional one). Its content must be synced first.
    fn seal_image(&self, _unsealed: &ImageKey, _key: &ImageKey) -> Result<()> {
        Err(no_image_volumes())
    }

    /// [`Capabilities::templates`]: makes the volume in `slot` (empty) a writable clone of
    /// snapshot `snapshot` of the live volume `template`; `NotFound` when either is missing.
    fn clone_snapshot(&self, template: &VolumeName, snapshot: &str, _slot: Slot<'_>) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "this driver cannot clone a snapshot ({template}@{snapshot}): templates need a driver with writable clones of snapshots (btrfs, zfs, thin lvm)"
            ),
        ))
    }

    /// Makes the volume in `slot` (empty) a writable clone of the sealed image volume `key`,
    /// or (see [`Cloned::CopyFrom`]) an empty volume for the core to copy it into.
    fn clone_image(&self, _key: &ImageKey, _slot: Slot<'_>) -> Result<Cloned> {
        Err(no_image_volumes())
    }

    /// The pool's image volumes, sealed or not.
    fn images(&self) -> Result<Vec<ImageVolume>> {
        Ok(Vec::new())
    }

    /// Renames the sealed image volume `key` aside, where only [`ImageVolume::holders`]
    /// depend on it: it is no longer listed or cloned, and [`Driver::destroy`] of its last
    /// holder destroys it.
    fn park_image(&self, _key: &ImageKey) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this driver's image volumes have no holders to park them for",
        ))
    }

    /// Destroys the image volume `key` (`sealed` says which); a missing one is not an error.
    /// Volumes cloned from it keep their content.
    fn destroy_image(&self, _key: &ImageKey, _sealed: bool) -> Result<()> {
        Err(no_image_volumes())
    }
}

fn no_image_volumes() -> Error {
    Error::new(ErrorKind::Unsupported, "this pool keeps no image volumes")
}
