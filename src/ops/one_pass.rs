//! Unpacking an image while measuring it, so that a first fill from an image decodes it once
//! instead of twice (measure, then unpack): into a new image volume (see `image_volume.rs`),
//! or, on pools without them, straight into the volume's new slot when its limit can be set
//! after the fill (dir, btrfs, zfs; not lvm, whose limit is the size of a device holding a
//! filesystem).
//!
//! What measuring first guaranteed still holds. The unpack stops before the entry that would
//! take more than the pool's free space allows (the plan's own arithmetic), so it never fills
//! a pool up; the rootfs prefix guessed at the first entry is checked against measure's verdict
//! at the end; and whenever the one pass fails (a wrong guess, an image it refuses, a full
//! pool), what it wrote is removed and the image is measured first, as without it, so that
//! the tree and the error are exactly those of measuring first. Only in-place rebuilds, which
//! destroy the old content before they unpack, always measure first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::image::archive::Archive as _;
use crate::measure::alongside::{Alongside, Budget, Measured};

use super::*;

/// The most a one-pass unpack may take: what the plan would accept had the image been
/// measured first (the pool's free space less the headroom).
pub(super) fn budget_of(driver: &dyn Driver, fill: &Fill) -> Result<Budget> {
    let space = driver.pool_space()?;
    Ok(Budget {
        bytes: (space.available as f64 / (1.0 + fill.headroom.max(0.0))) as u64,
        inodes: space.inodes_available,
    })
}

/// Unpacks the opened image into `root` while measuring it; the measurement (with the
/// image's format and compression) when the guessed rootfs prefix was measure's. Setting
/// `stop` interrupts it, as a signal does.
pub(super) fn unpack_alongside(
    events: &mut Events,
    root: &Mounted,
    opened: &Opened,
    idmap: &IdMap,
    fill: &Fill,
    budget: Budget,
    stop: &AtomicBool,
) -> Result<Measured> {
    let mut reader = image::open(&opened.file, opened.detected)?;
    let compression = reader.compression;
    let mut archive = Alongside::new(
        &mut *reader.archive,
        opened.prefix.as_deref(),
        idmap,
        budget,
    )?;
    let options = unpack::Options {
        prefix: archive.prefix(),
        idmap: idmap.clone(),
        skip: Vec::new(),
        expected_bytes: None,
        unsupported_metadata: fill.unsupported_metadata,
    };
    let size = opened.file.metadata().map_or(0, |m| m.len());
    let mut observer = ImageBytesObserver {
        events: &mut *events,
        read: reader.read.clone(),
        size,
        stop,
    };
    unpack::unpack(&mut archive, root.root(), &options, &mut observer)?;
    let skipped = archive.skipped().to_vec();
    let measured = archive.finish()?;
    if matches!(measured, Measured::Unpacked(_)) {
        warn_skipped(events, &skipped);
    }
    events.progress(EventPhase::Unpack, size, size, Unit::ImageBytes);
    Ok(match measured {
        Measured::Unpacked(mut m) => {
            m.format = opened.detected.format;
            m.compression = compression;
            Measured::Unpacked(m)
        }
        other => other,
    })
}

/// Whether a fill measures while it unpacks into the volume's new slot: an image the
/// measure cache does not know, on a pool without image volumes whose limit can be set after
/// the fill (a quota, not an LV's size), in an atomic build that is not a dry run.
pub(super) fn fills_in_one_pass(driver: &dyn Driver, opened: &Opened) -> bool {
    !driver.capabilities().image_volumes
        && driver.capabilities().late_limit
        && opened.remembered().is_none()
}

/// Unpack progress as the share of the image file read, for an unpack whose total of bytes
/// is not known beforehand.
struct ImageBytesObserver<'e> {
    events: &'e mut Events,
    read: Arc<AtomicU64>,
    size: u64,
    stop: &'e AtomicBool,
}

impl Observer for ImageBytesObserver<'_> {
    fn progress(&mut self, _unpacked: u64) {
        let read = self.read.load(Ordering::Relaxed).min(self.size);
        self.events
            .progress(EventPhase::Unpack, read, self.size, Unit::ImageBytes);
    }
    fn warning(&mut self, code: Warning, message: &str) {
        self.events.warning(code, message);
    }
    fn cancelled(&self) -> bool {
        signals::cancelled() || self.stop.load(Ordering::Relaxed)
    }
}

/// Creates the `New` slot without a limit and unpacks the image into it while measuring it,
/// then plans and sets its size; or, when the one pass fails, removes it and measures first.
/// Returns the slot's open root and the content, measured.
pub(super) fn fill_new_in_one_pass(
    held: &mut LockedVolume<'_>,
    opened: &Opened,
    filling: &Filling<'_>,
    created: &str,
    timings: &mut Timings,
) -> Result<(Mounted, Content)> {
    let later = filling
        .plan_later
        .ok_or_else(|| Error::internal("an unmeasured fill without what its plan needs"))?;
    let (driver, volume) = (held.driver, held.volume);
    let budget = budget_of(driver, later.fill)?;
    let root = create_new(held, None, created, timings)?;
    // The image's SHA-256 is read beside the unpack, on the other core.
    let (measured, sha256) = timings.time("unpack", || {
        std::thread::scope(|scope| {
            let hashing = scope.spawn(|| opened.sha256());
            let measured = unpack_alongside(
                &mut *held.events,
                &root,
                opened,
                filling.idmap,
                later.fill,
                budget,
                &AtomicBool::new(false),
            );
            let sha256 = hashing
                .join()
                .unwrap_or_else(|_| Err(Error::internal("the image hash panicked")));
            (measured, sha256)
        })
    });
    match measured {
        Ok(Measured::Unpacked(m)) => {
            let sha256 = sha256?;
            opened.remember(held.state, &m, &sha256);
            let content = opened.try_clone()?.into_content(m, sha256, false);
            let written = content.measurement().tally;
            let plan = plan_for(
                held,
                later.fill,
                &content,
                later.current,
                later.mode,
                Some(written),
                Blocks::Unpacked,
            )?;
            if let Some(size) = fault::quota_override().or(plan.target_size) {
                if driver.capabilities().size_model == reimage_driver::SizeModel::Quota {
                    driver.set_size(Slot::building(volume), size)?;
                }
            }
            Ok((root, content))
        }
        Err(e) if e.code == Code::Interrupted => Err(e),
        // A wrong guess of the rootfs prefix, an image the unpack refused, a full pool.
        _ => {
            root.release()?;
            driver.destroy(Slot::building(volume), false)?;
            let content = measure_opened(
                held.state,
                held.events,
                opened.try_clone()?,
                filling.idmap,
                None,
                timings,
            )?;
            let plan = plan_for(
                held,
                later.fill,
                &content,
                later.current,
                later.mode,
                None,
                Blocks::Unpacked,
            )?;
            let measured = Filling {
                content: &content,
                target_size: plan.target_size,
                plan_later: None,
                ..*filling
            };
            let root = create_new(held, plan.target_size, created, timings)?;
            unpack_step(held, &root, &measured, &[], timings)?;
            Ok((root, content))
        }
    }
}
