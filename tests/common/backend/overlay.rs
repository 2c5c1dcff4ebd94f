//! An overlay pool: on the test machine's own filesystem, or (`quota: true`) on ext4 with
//! project quotas on a loop device (inside the QEMU guest: the host kernel has no quota
//! support). A volume is read by mounting its layers the way a manager would, from the slot's
//! own files (`lower`, `upper/`, `work/`), never through reimage.

use std::path::{Path, PathBuf};

use super::dir::Dir;
use super::{dir_quota, Storage, View};

pub struct Overlay {
    dir: Dir,
    quota: bool,
}

impl Overlay {
    pub fn new(dir: &Path, quota: bool) -> Overlay {
        let dir = if quota {
            dir_quota::new(dir, false)
        } else {
            Dir::new(dir)
        };
        Overlay { dir, quota }
    }

    /// The overlay options that mount `volume`: its lower layer from its `lower` record.
    fn options(pool: &Path, volume: &str) -> String {
        let slot = pool.join(volume);
        let record = std::fs::read_to_string(slot.join("lower")).unwrap();
        let lower = match record.trim_end().strip_prefix("image ") {
            Some(key) => pool.join(format!(".reimage-image.{key}")),
            None => pool.join(".reimage-empty"),
        };
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            slot.join("upper").display(),
            slot.join("work").display()
        )
    }
}

impl Storage for Overlay {
    fn driver(&self) -> &'static str {
        "overlay"
    }

    fn pool_config(&self) -> String {
        let quota = if self.quota { "quota = true\n" } else { "" };
        format!("path = {:?}\n{quota}", self.dir.pool)
    }

    /// The volume's content is its layers' merged view, at no path of the pool.
    fn volume_dir(&self) -> Option<PathBuf> {
        None
    }

    fn walked_by_reimage(&self) -> bool {
        true
    }

    fn exists(&self, volume: &str) -> bool {
        self.dir.pool.join(volume).join("upper").is_dir()
    }

    fn view(&self, volume: &str, at: PathBuf) -> View {
        let options = Overlay::options(&self.dir.pool, volume);
        View::mount(&["-t", "overlay", "-o", &options], "overlay", at)
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

    fn limit(&mut self, size: &str) {
        self.dir.limit(size)
    }

    fn limit_reached(&self) -> (&'static str, &'static str, usize) {
        self.dir.limit_reached()
    }
}
