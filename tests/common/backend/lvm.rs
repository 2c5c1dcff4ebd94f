//! An lvm pool: a volume group on a 2 GiB loop device, thick or with a 768 MiB thin pool
//! `pool`, the volumes holding ext4 or xfs (inside the QEMU guest).

use std::path::{Path, PathBuf};
use std::process::Command;

use reimage_driver::{Slot, SlotKind, VolumeName};

use super::{global_name, Devices, Snapshot, Storage, View};
use crate::common::{sh, succeeds};

pub struct Lvm {
    vg: String,
    thin: bool,
    xfs: bool,
    /// The driver's `mount_dir`: where it mounts volumes while it fills them.
    fill: PathBuf,
    _devices: Devices,
}

impl Lvm {
    pub fn new(dir: &Path, id: &str, thin: bool, xfs: bool) -> Lvm {
        let mut devices = Devices::default();
        let device = devices.loop_device(&dir.join("lvm.img"), 2 << 30);
        let vg = global_name(id);
        sh(Command::new("vgcreate").args(["-q", &vg]).arg(&device));
        if thin {
            sh(Command::new("lvcreate").args([
                "-q",
                "--type",
                "thin-pool",
                "-L",
                "768M",
                "-n",
                "pool",
                &vg,
            ]));
        }
        Lvm {
            vg,
            thin,
            xfs,
            fill: dir.join("fill"),
            _devices: devices,
        }
    }

    /// `VG/LV` of a live volume, named as the driver names it.
    fn lv(&self, volume: &str) -> String {
        let volume = VolumeName::parse(volume).unwrap();
        let slot = Slot {
            volume: &volume,
            kind: SlotKind::Live,
        };
        format!("{}/{}", self.vg, reimage_driver_lvm::lv_name(slot))
    }

    /// Whether the LV (`VG/LV`) exists: at once if its device node is there (it is active),
    /// otherwise as `lvs` says (thin snapshots are created inactive).
    fn exists_named(lv: &str) -> bool {
        Path::new(&Self::dm_path(lv)).exists() || succeeds(Command::new("lvs").arg(lv))
    }

    fn dm_path(lv: &str) -> String {
        let (vg, name) = lv.split_once('/').unwrap();
        reimage_driver_lvm::dm_path(vg, name)
    }

    /// The device of an LV (`VG/LV`), activated first if it is not.
    fn device(&self, lv: &str) -> String {
        let path = Self::dm_path(lv);
        if !Path::new(&path).exists() {
            sh(Command::new("lvchange").args(["-q", "-ay", "-K", lv]));
        }
        path
    }

    /// Mounts a volume's LV as a manager would; `snapshot`: a snapshot the test took, whose
    /// xfs has its origin's UUID (the kernel refuses a second mount of one unless told).
    fn mount(&self, lv: &str, at: PathBuf, snapshot: bool) -> View {
        let options = if self.xfs && snapshot {
            "nouuid"
        } else {
            "defaults"
        };
        View::mount(&["-o", options], &self.device(lv), at)
    }
}

impl Drop for Lvm {
    fn drop(&mut self) {
        let _ = Command::new("vgremove")
            .args(["-q", "-f", "-y", &self.vg])
            .output();
    }
}

impl Storage for Lvm {
    fn driver(&self) -> &'static str {
        "lvm"
    }

    fn pool_config(&self) -> String {
        let fs = if self.xfs { "xfs" } else { "ext4" };
        let thin = if self.thin {
            "thin_pool = \"pool\"\n"
        } else {
            ""
        };
        format!(
            "vg = {:?}\n{thin}fs = {fs:?}\nmount_dir = {:?}\n",
            self.vg, self.fill
        )
    }

    fn volume_dir(&self) -> Option<PathBuf> {
        None
    }

    fn image_volume_sized_first(&self) -> bool {
        true
    }

    fn exists(&self, volume: &str) -> bool {
        Self::exists_named(&self.lv(volume))
    }

    fn view(&self, volume: &str, at: PathBuf) -> View {
        self.mount(&self.lv(volume), at, false)
    }

    fn take_snapshot(&self, volume: &str, name: &str) -> Snapshot {
        let mut cmd = Command::new("lvcreate");
        cmd.args(["-q", "-s", "-n", name]);
        if !self.thin {
            cmd.args(["-L", "64M"]);
        }
        sh(cmd.arg(self.lv(volume)));
        Snapshot(format!("{}/{name}", self.vg))
    }

    fn snapshot_view(&self, snap: &Snapshot, at: PathBuf) -> Option<View> {
        Self::exists_named(&snap.0).then(|| self.mount(&snap.0, at, true))
    }

    fn drop_snapshot(&self, snap: Snapshot) {
        sh(Command::new("lvremove").args(["-q", "-y", &snap.0]));
    }

    /// Thin pools allocate only what is written, so a thin filler is written; a thick one
    /// takes the extents.
    fn fill_leaving(&self, left: u64) {
        let vg = &self.vg;
        if self.thin {
            let report = sh(Command::new("lvs").args([
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_size,data_percent",
                &format!("{vg}/pool"),
            ]));
            let mut f = report.split_whitespace();
            let size: f64 = f.next().unwrap().parse().unwrap();
            let used: f64 = f.next().unwrap().parse().unwrap();
            let free = (size * (1.0 - used / 100.0)) as u64;
            let fill = (free - left) >> 20;
            sh(Command::new("lvcreate").args([
                "-q",
                "-V",
                &format!("{}M", fill + 64),
                "--thin",
                "-n",
                "filler",
                &format!("{vg}/pool"),
            ]));
            let device = self.device(&format!("{vg}/filler"));
            sh(Command::new("dd").args([
                "if=/dev/zero",
                &format!("of={device}"),
                "bs=1M",
                &format!("count={fill}"),
                "oflag=direct",
                "status=none",
            ]));
        } else {
            let report = sh(Command::new("vgs").args([
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_free,vg_extent_size",
                vg,
            ]));
            let mut f = report.split_whitespace();
            let free: u64 = f.next().unwrap().parse().unwrap();
            let extent: u64 = f.next().unwrap().parse().unwrap();
            let extents = (free - left) / extent;
            sh(Command::new("lvcreate").args([
                "-q",
                "-l",
                &extents.to_string(),
                "-n",
                "filler",
                vg,
            ]));
        }
    }

    fn unfill(&self) {
        sh(Command::new("lvremove").args(["-q", "-y", &format!("{}/filler", self.vg)]));
    }

    /// Temporary LVs, unsealed image volumes, and mount points left in the driver's `mount_dir`.
    fn leftovers(&self) -> Vec<String> {
        let all = sh(Command::new("lvs").args(["--noheadings", "-o", "lv_name", &self.vg]));
        let mut left: Vec<String> = all
            .split_whitespace()
            .filter(|n| {
                reimage_driver_lvm::slot_of(n).is_some_and(|(_, kind)| kind != SlotKind::Live)
                    || reimage_driver_lvm::image_of(n).is_some_and(|(_, sealed)| !sealed)
            })
            .map(str::to_owned)
            .collect();
        for pool_dir in std::fs::read_dir(&self.fill)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(dirs) = std::fs::read_dir(pool_dir.path()) {
                left.extend(
                    dirs.flatten()
                        .map(|d| format!("mount point: {:?}", d.path())),
                );
            }
        }
        left
    }

    /// An LV's filesystem fills up (ENOSPC) where a quota is exhausted (EDQUOT); xfs is at
    /// least 300 MiB, so the image must be larger than that.
    fn limit_reached(&self) -> (&'static str, &'static str, usize) {
        ("insufficient_space", "full", if self.xfs { 96 } else { 64 })
    }
}
