//! Per-volume locks: `flock` on `state_dir/locks/POOL/VOLUME.lock`, taken without waiting.
//!
//! The lock file is removed on release. A waiter that opened the file before it was removed
//! could lock an orphaned inode, so after locking we check that the path still names the file
//! we hold, and start again if not. A process killed with the lock held releases it with its
//! last fd; the file left behind is harmless and reused.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Code, Error, Result};

pub struct VolumeLock {
    path: PathBuf,
    _fd: OwnedFd,
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))
}

impl VolumeLock {
    pub fn acquire(state_dir: &Path, pool: &str, volume: &str) -> Result<VolumeLock> {
        let dir = state_dir.join("locks").join(pool);
        private_dir(&dir)?;
        let path = dir.join(format!("{volume}.lock"));
        loop {
            let fd = rustix::fs::open(
                &path,
                OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| Error::internal(format!("cannot open lock {}: {e}", path.display())))?;
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => {
                    return Err(Error::new(
                        Code::Locked,
                        format!("volume {pool}/{volume} is being changed by another reimage request; try again when it is done"),
                    ))
                }
                Err(e) => return Err(Error::internal(format!("cannot lock {}: {e}", path.display()))),
            }
            let held =
                rustix::fs::fstat(&fd).map_err(|e| Error::internal(format!("fstat lock: {e}")))?;
            match rustix::fs::stat(&path) {
                Ok(now) if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino) => {
                    return Ok(VolumeLock { path, _fd: fd })
                }
                // Removed or replaced by the previous holder's release: lock the new file.
                Ok(_) | Err(Errno::NOENT) => continue,
                Err(e) => return Err(Error::internal(format!("cannot stat lock: {e}"))),
            }
        }
    }
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        // Removed while still held, so nobody can lock this inode after us.
        let _ = std::fs::remove_file(&self.path);
    }
}
