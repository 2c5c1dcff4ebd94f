//! Mounting a volume's layers for reimage alone: a detached overlayfs mount (`fsopen`,
//! `fsmount`) that is in no mount namespace, so nobody else sees it, no mount point is made,
//! and it is gone when its last file descriptor is closed, also after `SIGKILL`.
//!
//! The options are fixed: `index=off` and `metacopy=off` (so that no upper layer can point
//! at another one's files by their origin), `redirect_dir=follow` (renamed directories read
//! as a manager's mount shows them; a redirect names a path inside the layers, never outside),
//! `xino=off`. Setuid, device and exec permissions are off.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use reimage_driver::{Error, Mounted, Result};
use rustix::fs::{Mode, OFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};

/// The layers of one mount: read-only lower layers (top first) and, for a writable mount,
/// the upper and work directories.
pub struct Layers<'a> {
    pub lower: Vec<&'a Path>,
    pub upper: Option<(&'a Path, &'a Path)>,
}

/// Mounts `layers` detached and opens the merged root. `shown` names the volume in errors.
pub fn mount(layers: &Layers<'_>, shown: &str) -> Result<Mounted> {
    let fail = |what: &str, fs: Option<BorrowedFd<'_>>, e: rustix::io::Errno| {
        let log = fs.map(kernel_log).unwrap_or_default();
        let log = if log.is_empty() {
            String::new()
        } else {
            format!(" ({log})")
        };
        Error::errno(format!("mounting the layers of {shown}: {what}{log}"), e)
    };
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| fail("fsopen overlay (is the overlay module loaded?)", None, e))?;
    let lowerdir = layers
        .lower
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let mut options: Vec<(&str, String)> = vec![("lowerdir", lowerdir)];
    if let Some((upper, work)) = layers.upper {
        options.push(("upperdir", upper.to_string_lossy().into_owned()));
        options.push(("workdir", work.to_string_lossy().into_owned()));
    }
    for (key, value) in [
        ("index", "off"),
        ("metacopy", "off"),
        ("redirect_dir", "follow"),
        ("xino", "off"),
    ] {
        options.push((key, value.to_owned()));
    }
    for (key, value) in &options {
        rustix::mount::fsconfig_set_string(&fs, *key, value.as_str())
            .map_err(|e| fail(&format!("{key}={value}"), Some(fs.as_fd()), e))?;
    }
    rustix::mount::fsconfig_create(&fs).map_err(|e| fail("create", Some(fs.as_fd()), e))?;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    if layers.upper.is_none() {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| fail("fsmount", Some(fs.as_fd()), e))?;
    let root: OwnedFd = rustix::fs::openat(
        &mnt,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail("opening the merged root", None, e))?;
    // The mount lives while either fd does; closing both dissolves it.
    Ok(Mounted::with_release(
        root,
        Box::new(move || {
            drop(mnt);
            Ok(())
        }),
    ))
}

/// The messages the kernel left on a filesystem context (`e overlayfs: ...`), joined.
fn kernel_log(fs: BorrowedFd<'_>) -> String {
    let mut lines = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        lines.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
    }
    lines.join("; ")
}
