//! Least privilege, applied once at start, before any thread exists.
//!
//! reimage runs as root on hosts full of other people's data, from `sudo` or a daemon, so it
//! gives up what it never needs: file descriptors it inherited (beyond stdin, stdout,
//! stderr), the ability to gain privileges through exec (`NO_NEW_PRIVS`), the network (a new,
//! empty network namespace), the host's mount table (a mount namespace of its own that
//! receives the host's mounts but sends none back, so a volume reimage mounts to fill it is
//! invisible to everybody else and unmounted by the kernel when reimage ends, even by
//! `SIGKILL`), and every capability outside the set below — from the bounding
//! set too, so no child program can get them back. `CAP_SYS_RESOURCE` is among those dropped:
//! reimage's own writes must respect quotas and reserved blocks like anybody's.

use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::config::DriverKind;

/// What unpacking and the drivers need.
pub fn needed() -> CapabilitySet {
    CapabilitySet::CHOWN // owners from the image
        | CapabilitySet::DAC_OVERRIDE // files and directories of any owner and mode
        | CapabilitySet::DAC_READ_SEARCH // linkat(AT_EMPTY_PATH); open_by_handle_at (btrfs templates)
        | CapabilitySet::FOWNER // modes and times on files owned by others
        | CapabilitySet::FSETID // setuid and setgid bits
        | CapabilitySet::MKNOD // device nodes
        | CapabilitySet::SETFCAP // security.capability
        | CapabilitySet::LINUX_IMMUTABLE // clearing immutable flags when deleting a volume
        | CapabilitySet::SYS_ADMIN // trusted.* xattrs, btrfs ioctls, mounting volumes
        | CapabilitySet::SYS_PTRACE // naming the process that keeps a volume busy
}

/// Enters a mount namespace of its own in which every mount is a downstream (slave) of the
/// host's: the host's mounts and unmounts still show here, ours never show there.
///
/// # Safety
/// The caller must be the only thread of the process (`unshare` of a namespace).
unsafe fn private_mounts() -> std::result::Result<(), String> {
    use rustix::mount::MountPropagationFlags;
    // SAFETY: the caller is the process's only thread (this function's contract).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .map_err(|e| format!("could not enter a new mount namespace: {e}"))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
    )
    .map_err(|e| format!("could not make the mounts of reimage's namespace private: {e}"))
}

/// Loads the kernel modules the driver's backend needs but does not load itself, while
/// reimage may still load modules (it gives that up in [`reduce`]); returns what failed, for
/// the log. `lvm`: LVM's `lvcreate` wants the `snapshot` device-mapper target for every
/// snapshot, thin ones too (which do not use it), and loading it is its own `modprobe`.
pub fn load_modules(driver: DriverKind) -> Vec<String> {
    let wanted: &[&str] = match driver {
        DriverKind::Lvm => &["dm_snapshot"],
        _ => &[],
    };
    let mut notes = Vec::new();
    for module in wanted {
        if std::path::Path::new("/sys/module").join(module).exists() {
            continue;
        }
        if let Err(e) = reimage_driver::command::run("modprobe", ["-q", module]) {
            notes.push(format!(
                "could not load the kernel module {module} (LVM needs it to snapshot or clone a volume): {e}"
            ));
        }
    }
    notes
}

/// Proof that [`reduce`] ran, with what it could not do (for the log). Only [`reduce`] makes
/// one, so code that takes a `Reduced` runs with the privileges given up.
#[derive(Debug)]
pub struct Reduced {
    pub notes: Vec<String>,
}

/// Applies the reductions; returns what could not be done (for the log), never failing the
/// request over a hardening step the kernel refused.
///
/// # Safety
/// The caller must be the only thread of the process (namespaces are entered with `unshare`,
/// which is unsound beside other threads), and nothing in the process may own a file
/// descriptor from 3 up: every one of them is closed here, under whatever holds it. `main`
/// calls this once, before it opens anything but the standard streams.
pub unsafe fn reduce() -> Reduced {
    let mut notes = Vec::new();
    // SAFETY: the caller owns no descriptor from 3 up (this function's contract).
    let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed != 0 {
        notes.push(format!(
            "could not close inherited file descriptors: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Walks hold a bounded number of directories open, but many writers and a deep preserve
    // use more than the usual soft limit of 1024 would leave to spare.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
            notes.push(format!("could not raise the open-file limit: {e}"));
        }
    }
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        notes.push(format!("could not set no_new_privs: {e}"));
    }
    // SAFETY: the caller is the process's only thread (this function's contract).
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
    {
        notes.push(format!("could not enter a new network namespace: {e}"));
    }
    // SAFETY: the caller is the process's only thread (this function's contract).
    if let Err(e) = unsafe { private_mounts() } {
        notes.push(e);
    }
    let keep = needed();
    for cap in 0..64u64 {
        if keep.bits() & (1 << cap) == 0 {
            // SAFETY: a plain prctl; EINVAL for numbers the kernel does not know is expected.
            unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
    }
    match rustix::thread::capabilities(None) {
        Ok(current) => {
            let sets = CapabilitySets {
                effective: current.effective & keep,
                permitted: current.permitted & keep,
                inheritable: CapabilitySet::empty(),
            };
            if let Err(e) = rustix::thread::set_capabilities(None, sets) {
                notes.push(format!("could not reduce capabilities: {e}"));
            }
        }
        Err(e) => notes.push(format!("could not read capabilities: {e}")),
    }
    Reduced { notes }
}
