//! Per-volume locks: `flock` on `state_dir/locks/POOL/VOLUME.lock`, taken without waiting.
//!
//! The lock file is removed on release. A waiter that opened the file before it was removed
//! could lock an orphaned inode, so after locking we check that the name still refers to the
//! file we hold, and start again if not. A process killed with the lock held releases it
//! with its last fd; the file left behind is harmless and reused.

use std::os::fd::OwnedFd;

use reimage_driver::records::RecordDir;
use rustix::fs::{FlockOperation, OFlags};
use rustix::io::Errno;

use crate::error::{Code, Error, Result};

pub struct VolumeLock {
    dir: RecordDir,
    name: String,
    _fd: OwnedFd,
}

impl VolumeLock {
    pub fn acquire(state: &RecordDir, pool: &str, volume: &str) -> Result<VolumeLock> {
        let dir = state.area(&["locks", pool]).map_err(|e| {
            Error::internal(format!(
                "cannot make the lock directory in {}: {e}",
                state.path().display()
            ))
        })?;
        let name = format!("{volume}.lock");
        let failed = |what: &str, e: std::io::Error| {
            Error::internal(format!(
                "cannot {what} the lock {}: {e}",
                dir.path().join(&name).display()
            ))
        };
        loop {
            let fd = dir
                .open_file(&name, OFlags::RDWR | OFlags::CREATE)
                .map_err(|e| failed("open", e))?;
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => {
                    return Err(Error::new(
                        Code::Locked,
                        format!("volume {pool}/{volume} is being changed by another reimage request; try again when it is done"),
                    ))
                }
                Err(e) => return Err(failed("take", e.into())),
            }
            let held = rustix::fs::fstat(&fd).map_err(|e| failed("stat", e.into()))?;
            match dir.stat(&name).map_err(|e| failed("stat", e))? {
                Some(now) if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino) => {
                    return Ok(VolumeLock { dir, name, _fd: fd })
                }
                // Removed or replaced by the previous holder's release: lock the new file.
                _ => continue,
            }
        }
    }
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        // Removed while still held, so nobody can lock this inode after us.
        let _ = self.dir.remove(&self.name);
    }
}
