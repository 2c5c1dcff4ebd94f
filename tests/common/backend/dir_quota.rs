//! A dir pool with project quotas: ext4 (with the project feature) or xfs on a loop device,
//! mounted with `prjquota` (inside the QEMU guest: the host kernel has no quota support).

use std::path::Path;
use std::process::Command;

use super::dir::Dir;
use super::Devices;
use crate::common::sh;

/// A [`Dir`] pool on its own filesystem, with `quota = true`.
pub fn new(dir: &Path, xfs: bool) -> Dir {
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
    Dir::on(mount, devices).with_quota()
}
