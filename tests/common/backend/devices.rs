//! Loop devices and mounts a test made, undone in reverse order when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::sh;

#[derive(Default)]
pub struct Devices {
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
}

impl Devices {
    /// A sparse file of `bytes` at `image` on a new loop device.
    pub fn loop_device(&mut self, image: &Path, bytes: u64) -> String {
        std::fs::File::create(image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let device = sh(Command::new("losetup").args(["-f", "--show"]).arg(image))
            .trim()
            .to_owned();
        self.loops.push(device.clone());
        device
    }

    /// Mounts `what` (with `options`, e.g. `["-t", "tmpfs"]`) at `at`, made first.
    pub fn mount(&mut self, options: &[&str], what: &str, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        sh(Command::new("mount").args(options).arg(what).arg(at));
        self.mounts.push(at.to_owned());
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        for device in self.loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&device).status();
        }
    }
}

/// A volume's directory, for reading it; mounted (by the test, outside reimage) for as long
/// as this lives, where the volume is a dataset or a device.
pub struct View {
    pub path: PathBuf,
    mounted: bool,
}

impl View {
    /// A directory that is there already.
    pub fn at(path: PathBuf) -> View {
        View {
            path,
            mounted: false,
        }
    }

    /// `what` mounted with `options` at `at` (made first).
    pub fn mount(options: &[&str], what: &str, at: PathBuf) -> View {
        std::fs::create_dir_all(&at).unwrap();
        sh(Command::new("mount").args(options).arg(what).arg(&at));
        View {
            path: at,
            mounted: true,
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}
