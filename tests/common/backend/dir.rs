//! A dir pool: a directory on the test machine's own filesystem.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Devices, Storage, View};
use crate::common::sh;

pub struct Dir {
    pub pool: PathBuf,
    /// Where the filler of [`Storage::fill_leaving`] goes: the filesystem the pool is on.
    filler_dir: PathBuf,
    devices: Devices,
}

impl Dir {
    pub fn new(dir: &Path) -> Dir {
        Dir::at(dir.join("pool"), dir.join("pool"))
    }

    /// A pool at `pool` on the filesystem mounted at `filesystem`.
    pub fn at(pool: PathBuf, filesystem: PathBuf) -> Dir {
        std::fs::create_dir_all(&pool).unwrap();
        Dir {
            pool,
            filler_dir: filesystem,
            devices: Devices::default(),
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
        format!("path = {:?}\n", self.pool)
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

    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.pool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| reimage_driver::temporary_slot(n).is_some())
            .collect()
    }

    fn limit(&mut self, size: &str) {
        let pool = self.pool.to_string_lossy().into_owned();
        self.devices.mount(
            &["-t", "tmpfs", "-o", &format!("size={size}")],
            "reimage-test",
            Path::new(&pool),
        );
    }
}
