//! Named fault points at every step boundary of the operations, compiled in only with the
//! `fault-injection` cargo feature (for tests). With `REIMAGE_FAULT=NAME` the process kills
//! itself with SIGKILL when it reaches point NAME; with `REIMAGE_FAULT=NAME@error` the step
//! fails there with an `internal` error instead. Without the feature every point is a no-op
//! that the compiler removes.
//!
//! The unit tests arm a point on their own thread instead ([`arm`]): a simulated crash
//! unwinds out of the request as the fake driver's does, and [`passed`] tells which points a
//! request went through.

use crate::error::Result;

/// Every point, in the order an operation passes them.
pub const POINTS: &[&str] = &[
    "create:journaled",
    "create:created",
    "create:unpacked",
    "image:created",
    "image:unpacked",
    "image:sealed",
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

#[cfg(any(test, feature = "fault-injection"))]
pub fn point(name: &str) -> Result<()> {
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    #[cfg(test)]
    if let Some(outcome) = armed::reached(name) {
        return outcome;
    }
    #[cfg(feature = "fault-injection")]
    if let Ok(spec) = std::env::var("REIMAGE_FAULT") {
        let (target, action) = spec.rsplit_once('@').unwrap_or((spec.as_str(), "kill"));
        if target == name {
            if action == "error" {
                return Err(crate::error::Error::internal(format!(
                    "injected fault at {name}"
                )));
            }
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            // SIGKILL cannot be caught; this is not reached.
            std::process::abort()
        }
    }
    Ok(())
}

#[cfg(not(any(test, feature = "fault-injection")))]
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

/// What a unit test arms a point with.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// The step fails with an `internal` error.
    Error,
    /// The process "dies": [`reimage_driver::fake::SimulatedCrash`] unwinds out of it.
    Crash,
}

#[cfg(test)]
pub use armed::{arm, passed};

#[cfg(test)]
mod armed {
    use std::cell::RefCell;

    use super::Armed;
    use crate::error::{Error, Result};

    thread_local! {
        static ARMED: RefCell<Option<(String, Armed)>> = const { RefCell::new(None) };
        static PASSED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Arms `point` on this thread (`None`: disarms); clears the record of passed points.
    pub fn arm(point: Option<(&str, Armed)>) {
        ARMED.with(|a| *a.borrow_mut() = point.map(|(p, how)| (p.to_owned(), how)));
        PASSED.with(|p| p.borrow_mut().clear());
    }

    /// The points passed on this thread since it was last armed, in order.
    pub fn passed() -> Vec<String> {
        PASSED.with(|p| p.borrow().clone())
    }

    pub(super) fn reached(name: &str) -> Option<Result<()>> {
        PASSED.with(|p| p.borrow_mut().push(name.to_owned()));
        let armed = ARMED.with(|a| a.borrow().clone())?;
        if armed.0 != name {
            return None;
        }
        match armed.1 {
            Armed::Error => Some(Err(Error::internal(format!("injected fault at {name}")))),
            Armed::Crash => {
                std::panic::resume_unwind(Box::new(reimage_driver::fake::SimulatedCrash))
            }
        }
    }
}
