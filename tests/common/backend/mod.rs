//! The storage a test's pool lives on, one file per backend. Each makes its pool on devices
//! of its own, reads volumes and snapshots the backend's own way (never through reimage),
//! names slots by the driver's own rules, and removes all of it when dropped. The suites ask
//! a backend what they need; they never match on which one it is.

mod btrfs;
mod devices;
mod dir;
mod dir_quota;
mod dir_reflinks;
mod lvm;
mod overlay;
mod zfs;

use std::path::{Path, PathBuf};

pub use devices::{Devices, View};

/// Which storage a test's pool lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A directory on the test machine's own filesystem.
    Dir,
    /// A dir pool with image volumes, on a btrfs on a loop device made for the test.
    DirReflinks,
    /// A btrfs filesystem on a loop device made for the test, with or without quotas.
    Btrfs { quota: bool },
    /// A zpool on a loop device made for the test (inside the QEMU guest), volumes under
    /// its dataset `reimage`, limited by `refquota` or (`quota: true`) by `quota`.
    Zfs { quota: bool },
    /// As `Zfs` (refquota), with `zfs_clone = "copy"`: volumes are copies of image volumes.
    ZfsCopies,
    /// A volume group on a loop device (inside the QEMU guest), thick or with a thin pool,
    /// volumes holding ext4 or (`xfs: true`) xfs.
    Lvm { thin: bool, xfs: bool },
    /// A dir pool on ext4 or (`xfs: true`) xfs with project quotas, on a loop device
    /// (inside the QEMU guest: the host kernel has no quota support).
    DirQuota { xfs: bool },
    /// As `DirQuota` on xfs (which has reflinks), with image volumes: volumes are reflink
    /// copies, each charged to its own project.
    DirQuotaReflinks,
    /// An overlay pool on the test machine's own filesystem, or (`quota: true`, inside the
    /// QEMU guest) on ext4 with project quotas on a loop device.
    Overlay { quota: bool },
}

impl Backend {
    /// Makes the backend's pool under `dir` (a fresh directory of the test's own); `id`
    /// names the pool where the backend's names are global (zpools, volume groups).
    pub fn make(self, dir: &Path, id: &str) -> Box<dyn Storage> {
        match self {
            Backend::Dir => Box::new(dir::Dir::new(dir)),
            Backend::DirReflinks => Box::new(dir_reflinks::new(dir)),
            Backend::Btrfs { quota } => Box::new(btrfs::Btrfs::new(dir, quota)),
            Backend::Zfs { quota } => Box::new(zfs::Zfs::new(dir, id, quota, false)),
            Backend::ZfsCopies => Box::new(zfs::Zfs::new(dir, id, false, true)),
            Backend::Lvm { thin, xfs } => Box::new(lvm::Lvm::new(dir, id, thin, xfs)),
            Backend::DirQuota { xfs } => Box::new(dir_quota::new(dir, xfs)),
            Backend::DirQuotaReflinks => Box::new(dir_quota::new(dir, true).with_image_volumes()),
            Backend::Overlay { quota } => Box::new(overlay::Overlay::new(dir, quota)),
        }
    }
}

/// A name the backend's own tools know a pool by (a zpool, a volume group): global, so made
/// from the test's unique id, within the tools' length limits.
fn global_name(id: &str) -> String {
    format!("rt{}", id.replace(['-', '.'], "x"))
        .chars()
        .take(60)
        .collect()
}

/// The unsealed image volumes in a pool directory: what an interrupted build left.
fn unsealed_images(pool: &Path) -> Vec<String> {
    std::fs::read_dir(pool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(reimage_driver::image::UNSEALED_PREFIX))
        .collect()
}

/// A snapshot the test took of a volume, by the backend's own name for it (a path, `VG/LV`,
/// `DATASET@NAME`).
pub struct Snapshot(pub String);

/// One test's pool, as the backend's own tools see it.
pub trait Storage {
    /// The driver that serves this pool.
    fn driver(&self) -> &'static str;

    /// The lines of the pool's config section after `driver = ...`.
    fn pool_config(&self) -> String;

    /// The directory that holds the volumes, for pools whose volumes are directories (dir,
    /// btrfs); `None` where volumes are datasets or devices mounted only while in use.
    fn volume_dir(&self) -> Option<PathBuf>;

    /// Whether reimage walks the volume's tree itself to measure, copy and remove it (the
    /// volumes that are directories), rather than leaving that to the backend.
    fn walked_by_reimage(&self) -> bool {
        self.volume_dir().is_some()
    }

    /// Whether an image volume is made at the image's size (a filesystem on an LV), so a
    /// miss measures the image first and builds the image volume under the volume's journal,
    /// instead of building it while it measures.
    fn image_volume_sized_first(&self) -> bool {
        false
    }

    /// Whether the live volume exists.
    fn exists(&self, volume: &str) -> bool;

    /// The volume's content, readable at a directory for as long as the view lives (`at`:
    /// a fresh directory for a mount, where one is needed).
    fn view(&self, volume: &str, at: PathBuf) -> View;

    /// Takes a read-only snapshot of `volume` named `name`, the backend's own way.
    fn take_snapshot(&self, volume: &str, name: &str) -> Snapshot {
        panic!(
            "{} pools have no snapshots ({volume}@{name})",
            self.driver()
        )
    }

    /// The snapshot's content (`None` once it no longer exists).
    fn snapshot_view(&self, snap: &Snapshot, _at: PathBuf) -> Option<View> {
        panic!("{} pools have no snapshots ({})", self.driver(), snap.0)
    }

    fn drop_snapshot(&self, snap: Snapshot) {
        panic!("{} pools have no snapshots ({})", self.driver(), snap.0)
    }

    /// Fills the pool's storage with real allocations until about `left` bytes are free.
    fn fill_leaving(&self, left: u64);

    /// Undoes [`Storage::fill_leaving`].
    fn unfill(&self);

    /// Temporary slots, guard snapshots and mounts reimage left behind.
    fn leftovers(&self) -> Vec<String>;

    /// Limits the pool to `size` (a tmpfs size) where it has no limit of its own, for the
    /// full-pool cases; pools on a device of their own are small already.
    fn limit(&mut self, _size: &str) {}

    /// How the kernel stops an unpack at a volume's limit: reimage's error code, a word its
    /// message has, and how many 4 MiB files an image needs to get there.
    fn limit_reached(&self) -> (&'static str, &'static str, usize) {
        ("quota_exceeded", "quota", 64)
    }

    /// Makes volumes nested inside `volume`, as a container makes its own datasets or
    /// subvolumes; with `protected`, one the backend protects (a snapshot of its own, a
    /// read-only flag). False where volumes cannot nest.
    fn nest(&self, _volume: &str, _protected: bool) -> bool {
        false
    }

    /// The volumes nested in `volume` that still exist.
    fn nested(&self, _volume: &str) -> Vec<String> {
        Vec::new()
    }
}
