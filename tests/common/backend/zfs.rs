//! A zfs pool: a 1 GiB zpool on a loop device (a file vdev would need O_DIRECT, which the
//! guest's tmpfs lacks), the volumes under its dataset `reimage` (inside the QEMU guest).

use std::path::{Path, PathBuf};
use std::process::Command;

use reimage_driver::{Slot, SlotKind, VolumeName};

use super::{global_name, Devices, Snapshot, Storage, View};
use crate::common::{sh, succeeds};

pub struct Zfs {
    zpool: String,
    quota: bool,
    /// `zfs_clone = "copy"`.
    copies: bool,
    _devices: Devices,
}

impl Zfs {
    pub fn new(dir: &Path, id: &str, quota: bool, copies: bool) -> Zfs {
        let mut devices = Devices::default();
        let device = devices.loop_device(&dir.join("zfs.img"), 1 << 30);
        let zpool = global_name(id);
        sh(Command::new("zpool")
            .args(["create", "-f", "-m", "none", &zpool])
            .arg(&device));
        let zfs = Zfs {
            zpool,
            quota,
            copies,
            _devices: devices,
        };
        sh(Command::new("zfs").args(["create", &zfs.dataset()]));
        zfs
    }

    /// The dataset that holds the volumes.
    fn dataset(&self) -> String {
        format!("{}/reimage", self.zpool)
    }

    /// The dataset of a live volume, named as the driver names it.
    fn volume(&self, volume: &str) -> String {
        let volume = VolumeName::parse(volume).unwrap();
        let slot = Slot {
            volume: &volume,
            kind: SlotKind::Live,
        };
        format!("{}/{}", self.dataset(), slot.physical_name())
    }

    fn exists_named(name: &str) -> bool {
        succeeds(Command::new("zfs").args(["list", "-H", name]))
    }

    /// Every dataset and snapshot under the volumes' dataset.
    fn all(&self) -> Vec<String> {
        sh(Command::new("zfs").args([
            "list",
            "-H",
            "-t",
            "all",
            "-r",
            "-o",
            "name",
            &self.dataset(),
        ]))
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for Zfs {
    fn drop(&mut self) {
        let _ = Command::new("zpool")
            .args(["destroy", "-f", &self.zpool])
            .status();
    }
}

impl Storage for Zfs {
    fn driver(&self) -> &'static str {
        "zfs"
    }

    fn pool_config(&self) -> String {
        let property = if self.quota { "quota" } else { "refquota" };
        let copies = if self.copies {
            "zfs_clone = \"copy\"\n"
        } else {
            ""
        };
        format!(
            "dataset = {:?}\nquota_property = {property:?}\n{copies}",
            self.dataset()
        )
    }

    fn volume_dir(&self) -> Option<PathBuf> {
        None
    }

    fn exists(&self, volume: &str) -> bool {
        Self::exists_named(&self.volume(volume))
    }

    fn view(&self, volume: &str, at: PathBuf) -> View {
        View::mount(&["-t", "zfs"], &self.volume(volume), at)
    }

    fn take_snapshot(&self, volume: &str, name: &str) -> Snapshot {
        let snap = format!("{}@{name}", self.volume(volume));
        sh(Command::new("zfs").args(["snapshot", &snap]));
        Snapshot(snap)
    }

    fn snapshot_view(&self, snap: &Snapshot, at: PathBuf) -> Option<View> {
        Self::exists_named(&snap.0).then(|| View::mount(&["-t", "zfs"], &snap.0, at))
    }

    fn drop_snapshot(&self, snap: Snapshot) {
        sh(Command::new("zfs").args(["destroy", &snap.0]));
    }

    /// A reservation of all but `left` bytes.
    fn fill_leaving(&self, left: u64) {
        let available: u64 = sh(Command::new("zfs").args([
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "available",
            &self.dataset(),
        ]))
        .trim()
        .parse()
        .unwrap();
        sh(Command::new("zfs").args([
            "create",
            "-o",
            &format!("refreservation={}", available - left),
            &format!("{}/filler", self.zpool),
        ]));
    }

    fn unfill(&self) {
        sh(Command::new("zfs").args(["destroy", &format!("{}/filler", self.zpool)]));
    }

    fn leftovers(&self) -> Vec<String> {
        let below = format!("{}/", self.dataset());
        let guard = format!("@{}", reimage_driver_zfs::GUARD);
        let mut left: Vec<String> = self
            .all()
            .into_iter()
            .filter(|name| {
                let leaf = name.strip_prefix(&below).unwrap_or("");
                let dataset = leaf.split(['/', '@']).next().unwrap_or("");
                reimage_driver::temporary_slot(dataset).is_some()
                    || name.ends_with(&guard)
                    || dataset.starts_with(reimage_driver::image::UNSEALED_PREFIX)
                    || dataset.starts_with(reimage_driver::image::PARKED_PREFIX)
            })
            .collect();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        left.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&format!(" {below}")))
                .map(|l| format!("mounted: {l}")),
        );
        left
    }

    fn nest(&self, volume: &str, protected: bool) -> bool {
        let child = format!("{}/inner", self.volume(volume));
        sh(Command::new("zfs").args(["create", "-o", "mountpoint=legacy", &child]));
        if protected {
            sh(Command::new("zfs").args(["snapshot", &format!("{child}@s")]));
        }
        true
    }

    fn nested(&self, volume: &str) -> Vec<String> {
        // Below the volume, or below its old slot on the way out.
        let below = format!("{volume}/");
        self.all()
            .into_iter()
            .filter(|name| name.contains(&below))
            .collect()
    }
}
