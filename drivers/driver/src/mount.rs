//! Mounting a block- or dataset-backed volume for as long as reimage fills it.
//!
//! reimage runs in a mount namespace of its own whose mounts do not propagate to the host
//! (see the binary's `privilege` module), so a volume it mounts here is never visible to
//! anybody else, and the kernel unmounts it when the process ends, also after `SIGKILL`:
//! no crash can leave a volume mounted. The mount point is a directory under the pool's
//! `mount_dir`, in parents only root can enter, removed again on release.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::{Error, ErrorKind, Mounted, Result};

/// How long an unmount that finds the filesystem busy is retried: a process that just closed
/// its last file there (or a kernel worker) may still hold it for a moment.
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Makes `dir` and its missing parents, readable by root only.
fn private_dirs(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating the mount point {}", dir.display()), e))
}

use std::os::unix::fs::DirBuilderExt;

/// Mounts `source` (a device or a dataset) of type `fstype` at `dir` and opens its root.
/// Setuid, device and exec permissions are off: reimage only writes files there. Released by
/// unmounting (retried while busy) and removing `dir`.
pub fn mount_for_filling(
    source: &str,
    fstype: &str,
    dir: PathBuf,
    read_only: bool,
) -> Result<Mounted> {
    mount_with_options(source, fstype, dir, read_only, None)
}

/// [`mount_for_filling`] with the filesystem's own mount options (`data`, e.g. `nouuid`).
pub fn mount_with_options(
    source: &str,
    fstype: &str,
    dir: PathBuf,
    read_only: bool,
    data: Option<&std::ffi::CStr>,
) -> Result<Mounted> {
    private_dirs(&dir)?;
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount(source, &dir, fstype, flags, data).map_err(|e| {
        let _ = std::fs::remove_dir(&dir);
        Error::errno(
            format!("mounting {source} ({fstype}) at {}", dir.display()),
            e,
        )
    })?;
    let root = match open_dir(&dir) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = unmount(&dir);
            return Err(e);
        }
    };
    Ok(Mounted::with_release(root, Box::new(move || unmount(&dir))))
}

fn open_dir(dir: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::errno(format!("opening {}", dir.display()), e))
}

/// Unmounts `dir` (retrying for a while when busy) and removes it.
pub fn unmount(dir: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        match rustix::mount::unmount(dir, UnmountFlags::empty()) {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => break,
            Err(Errno::BUSY) if started.elapsed() < BUSY_RETRY => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(Errno::BUSY) => {
                return Err(Error::new(
                    ErrorKind::Busy { holder: None },
                    format!(
                        "{} stayed busy for {} s after reimage was done with it",
                        dir.display(),
                        BUSY_RETRY.as_secs()
                    ),
                ))
            }
            Err(e) => return Err(Error::errno(format!("unmounting {}", dir.display()), e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("removing the mount point {}", dir.display()),
            e,
        )),
    }
}
