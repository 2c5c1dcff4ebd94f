//! Named fault points at every step boundary of the operations, compiled in only with the
//! `fault-injection` cargo feature (for tests). With `REIMAGE_FAULT=NAME` the process kills
//! itself with SIGKILL when it reaches point NAME; with `REIMAGE_FAULT=NAME@error` the step
//! fails there with an `internal` error instead. Without the feature every point is a no-op
//! that the compiler removes.

use crate::error::Result;

/// Every point, in the order an operation passes them.
pub const POINTS: &[&str] = &[
    "create:journaled",
    "create:created",
    "create:unpacked",
    "rebuild:journaled",
    "rebuild:created",
    "rebuild:unpacked",
    "rebuild:synced",
    "inplace:journaled",
    "inplace:detached",
    "inplace:created",
    "inplace:destroying",
    "inplace:unpacked",
    "refill:journaled",
    "refill:guarded",
    "refill:emptied",
    "refill:unpacked",
    "refill:synced",
    "refill:committed",
    "commit:journaled",
    "commit:swapped",
    "commit:cleaned",
    "delete:journaled",
    "delete:detached",
    "delete:destroyed",
];

#[cfg(feature = "fault-injection")]
pub fn point(name: &str) -> Result<()> {
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    let Ok(spec) = std::env::var("REIMAGE_FAULT") else {
        return Ok(());
    };
    let (target, action) = spec.rsplit_once('@').unwrap_or((spec.as_str(), "kill"));
    if target != name {
        return Ok(());
    }
    if action == "error" {
        return Err(crate::error::Error::internal(format!(
            "injected fault at {name}"
        )));
    }
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL cannot be caught; this is not reached.
    std::process::abort()
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) -> Result<()> {
    Ok(())
}

/// With the feature: `REIMAGE_FAULT_QUOTA=BYTES` gives the volume being built that size limit
/// instead of the planned one, so tests can make the kernel stop an unpack with EDQUOT.
#[cfg(feature = "fault-injection")]
pub fn quota_override() -> Option<u64> {
    std::env::var("REIMAGE_FAULT_QUOTA").ok()?.parse().ok()
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn quota_override() -> Option<u64> {
    None
}

/// `true` when this build has fault points (tests check it before relying on them).
pub const ENABLED: bool = cfg!(feature = "fault-injection");
