//! A dir pool: a directory on the test machine's own filesystem.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Devices, Storage, View};
use crate::common::sh;

pub struct Dir {
    pub pool: PathBuf,
    /// Where the filler of [`Storage::fill_leaving`] goes: the filesystem the pool is on.
    filler_dir: PathBuf,
    /// The pool limits volumes with project quotas.
    quota: bool,
    /// The pool keeps image volumes (its filesystem has reflinks).
    image_volumes: bool,
    /// The pool is a directory on the test machine's own filesystem (not on a device made
    /// for it, which is small already).
    on_host: bool,
    /// What the pool lives on (the tmpfs of [`Storage::limit`] goes on top).
    devices: Devices,
}

impl Dir {
    pub fn new(dir: &Path) -> Dir {
        let pool = dir.join("pool");
        Dir {
            on_host: true,
            ..Dir::at(pool.clone(), pool, Devices::default())
        }
    }

    /// A pool at `filesystem/pool`, on the filesystem mounted there (with `devices`).
    pub fn on(filesystem: PathBuf, devices: Devices) -> Dir {
        Dir::at(filesystem.join("pool"), filesystem, devices)
    }

    fn at(pool: PathBuf, filesystem: PathBuf, devices: Devices) -> Dir {
        std::fs::create_dir_all(&pool).unwrap();
        Dir {
            pool,
            filler_dir: filesystem,
            quota: false,
            image_volumes: false,
            on_host: false,
            devices,
        }
    }

    pub fn with_quota(self) -> Dir {
        Dir {
            quota: true,
            ..self
        }
    }

    pub fn with_image_volumes(self) -> Dir {
        Dir {
            image_volumes: true,
            ..self
        }
    }

    fn filler(&self) -> PathBuf {
        self.filler_dir.join("filler")
    }
}

impl Storage for Dir {
    fn driver(&self) -> &'static str {
        "dir"
    }

    fn pool_config(&self) -> String {
        let quota = if self.quota { "quota = true\n" } else { "" };
        let images = if self.image_volumes {
            "image_volumes = true\n"
        } else {
            ""
        };
        format!("path = {:?}\n{quota}{images}", self.pool)
    }

    fn volume_dir(&self) -> Option<PathBuf> {
        Some(self.pool.clone())
    }

    fn exists(&self, volume: &str) -> bool {
        self.pool.join(volume).exists()
    }

    fn view(&self, volume: &str, _at: PathBuf) -> View {
        View::at(self.pool.join(volume))
    }

    fn fill_leaving(&self, left: u64) {
        let st = rustix::fs::statvfs(&self.pool).unwrap();
        let free = st.f_bavail * st.f_frsize;
        sh(Command::new("fallocate")
            .arg("-l")
            .arg((free - left).to_string())
            .arg(self.filler()));
    }

    fn unfill(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    /// Temporary slots, and image volumes that were never sealed.
    fn leftovers(&self) -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(&self.pool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| reimage_driver::temporary_slot(n).is_some())
            .collect();
        found.extend(super::unsealed_images(&self.pool));
        found
    }

    fn limit(&mut self, size: &str) {
        if !self.on_host {
            return;
        }
        let pool = self.pool.to_string_lossy().into_owned();
        self.devices.mount(
            &["-t", "tmpfs", "-o", &format!("size={size}")],
            "reimage-test",
            Path::new(&pool),
        );
    }
}
