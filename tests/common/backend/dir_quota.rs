//! A dir pool with project quotas: ext4 (with the project feature) or xfs on a loop device,
//! mounted with `prjquota` (inside the QEMU guest: the host kernel has no quota support).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::dir::Dir;
use super::{Devices, Storage, View};
use crate::common::sh;

pub struct DirQuota {
    // Dropped before the devices it lives on.
    dir: Dir,
    _devices: Devices,
}

impl DirQuota {
    pub fn new(dir: &Path, xfs: bool) -> DirQuota {
        let mut devices = Devices::default();
        let device = devices.loop_device(&dir.join("quota.img"), 1 << 30);
        if xfs {
            sh(Command::new("mkfs.xfs").args(["-q", "-f", &device]));
        } else {
            sh(Command::new("mkfs.ext4").args([
                "-q",
                "-F",
                "-O",
                "quota,project",
                "-I",
                "256",
                &device,
            ]));
        }
        let mount = dir.join("mnt");
        devices.mount(&["-o", "prjquota"], &device, &mount);
        DirQuota {
            dir: Dir::at(mount.join("pool"), mount),
            _devices: devices,
        }
    }
}

impl Storage for DirQuota {
    fn driver(&self) -> &'static str {
        "dir"
    }

    fn pool_config(&self) -> String {
        format!("{}quota = true\n", self.dir.pool_config())
    }

    fn volume_dir(&self) -> Option<PathBuf> {
        self.dir.volume_dir()
    }

    fn exists(&self, volume: &str) -> bool {
        self.dir.exists(volume)
    }

    fn view(&self, volume: &str, at: PathBuf) -> View {
        self.dir.view(volume, at)
    }

    fn fill_leaving(&self, left: u64) {
        self.dir.fill_leaving(left)
    }

    fn unfill(&self) {
        self.dir.unfill()
    }

    fn leftovers(&self) -> Vec<String> {
        self.dir.leftovers()
    }
}
