//! A dir pool that keeps image volumes: on a btrfs on a loop device, a filesystem with
//! reflinks (volumes are reflink copies of image volumes).

use std::path::Path;

use super::btrfs;
use super::dir::Dir;

/// A [`Dir`] pool on its own btrfs, with `image_volumes = true`.
pub fn new(dir: &Path) -> Dir {
    let (mount, devices) = btrfs::filesystem(dir);
    Dir::on(mount, devices).with_image_volumes()
}
