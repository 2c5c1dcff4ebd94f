//! A btrfs pool: a 1 GiB btrfs on a loop device, mounted at `mnt`, the pool at `mnt/pool`;
//! snapshots beside the pool.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::dir::Dir;
use super::{Devices, Snapshot, Storage, View};
use crate::common::sh;

pub struct Btrfs {
    /// The pool (with its quota setting) on the btrfs mounted at `mount`.
    dir: Dir,
    mount: PathBuf,
}

/// A fresh 1 GiB btrfs on a loop device, mounted at `dir/mnt`.
pub fn filesystem(dir: &Path) -> (PathBuf, Devices) {
    let mut devices = Devices::default();
    let device = devices.loop_device(&dir.join("btrfs.img"), 1 << 30);
    sh(Command::new("mkfs.btrfs").args(["-q", "-f", &device]));
    let mount = dir.join("mnt");
    devices.mount(&[], &device, &mount);
    (mount, devices)
}

impl Btrfs {
    pub fn new(dir: &Path, quota: bool) -> Btrfs {
        let (mount, devices) = filesystem(dir);
        let dir = Dir::on(mount.clone(), devices);
        Btrfs {
            dir: if quota { dir.with_quota() } else { dir },
            mount,
        }
    }
}

impl Storage for Btrfs {
    fn driver(&self) -> &'static str {
        "btrfs"
    }

    fn pool_config(&self) -> String {
        self.dir.pool_config()
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

    fn take_snapshot(&self, volume: &str, name: &str) -> Snapshot {
        let dest = self.mount.join(name);
        sh(Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(self.dir.pool.join(volume))
            .arg(&dest));
        Snapshot(dest.to_string_lossy().into_owned())
    }

    fn snapshot_view(&self, snap: &Snapshot, _at: PathBuf) -> Option<View> {
        let path = PathBuf::from(&snap.0);
        path.exists().then(|| View::at(path))
    }

    fn drop_snapshot(&self, snap: Snapshot) {
        sh(Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&snap.0));
    }

    fn fill_leaving(&self, left: u64) {
        self.dir.fill_leaving(left)
    }

    fn unfill(&self) {
        self.dir.unfill()
    }

    /// Temporary slots, and image volumes that were never sealed.
    fn leftovers(&self) -> Vec<String> {
        self.dir.leftovers()
    }

    fn nest(&self, volume: &str, protected: bool) -> bool {
        let vol = self.dir.pool.join(volume);
        let subvolume = |path: PathBuf| {
            sh(Command::new("btrfs")
                .args(["subvolume", "create"])
                .arg(path));
        };
        if protected {
            // A subvolume with one inside it, made read-only.
            subvolume(vol.join("var-lib-machines"));
            subvolume(vol.join("var-lib-machines/inner"));
            std::fs::write(vol.join("var-lib-machines/inner/data"), b"x").unwrap();
            sh(Command::new("btrfs")
                .args(["property", "set"])
                .arg(vol.join("var-lib-machines"))
                .args(["ro", "true"]));
        } else {
            subvolume(vol.join("again"));
        }
        true
    }

    fn nested(&self, volume: &str) -> Vec<String> {
        let list = sh(Command::new("btrfs")
            .args(["subvolume", "list"])
            .arg(&self.mount));
        // Below the volume, or below its old slot on the way out.
        let below = format!("{volume}/");
        list.lines()
            .filter(|l| l.contains(&below))
            .map(str::to_owned)
            .collect()
    }
}
