//! The steps that fill a volume, shared by create, rebuild and refill: measure and plan,
//! unpack with the plan's numbers, copy preserved paths, seal; and the results they report.

use super::*;

/// Measures the fill's content and plans its size and space against the pool (the steps
/// create and rebuild share before anything of the volume changes); warns when `size`
/// cannot be enforced. `clones`: the fill builds a new slot beside the volume, cloning the
/// content's image volume where the pool keeps them (not an in-place rebuild or a refill,
/// which unpack into the volume), so the plan counts that image volume's space instead. Such
/// a fill, unless a dry run, may measure a first image while it unpacks it — into a new
/// image volume of `pool`, here, or into the volume's new slot later, when the content comes
/// back `Unmeasured` and without a plan (see `one_pass.rs`).
#[allow(clippy::too_many_arguments)]
pub(super) fn measure_and_plan(
    config: &Config,
    held: &mut LockedVolume<'_>,
    fill: &Fill,
    idmap: &IdMap,
    current: Option<&reimage_driver::Usage>,
    mode: Mode,
    clones: bool,
    pool: &str,
    timings: &mut Timings,
) -> Result<(Content, Option<Plan>)> {
    let driver = held.driver;
    let builds = (clones && !fill.dry_run).then_some(pool);
    let content = match (&fill.source, builds) {
        (Source::Template { volume, snapshot }, _) => template_content(driver, volume, snapshot)?,
        (_, Some(pool)) => match open_image(config, held.state, &fill.source, held.image, idmap)? {
            None => Content::Empty,
            Some(opened) if driver.capabilities().image_volumes => {
                measure_or_build(held, pool, opened, idmap, fill, timings)?
            }
            Some(opened) if fills_in_one_pass(driver, &opened) => {
                return Ok((Content::Unmeasured(opened), None));
            }
            Some(opened) => measure_opened(held.state, held.events, opened, idmap, None, timings)?,
        },
        (_, None) => open_and_measure(
            config,
            held.state,
            held.events,
            &fill.source,
            held.image,
            idmap,
            timings,
        )?,
    };
    // An image volume built while measuring holds the image already.
    let written = matches!(
        content,
        Content::Image {
            built_image_volume: true,
            ..
        }
    )
    .then(|| content.measurement().tally);
    let blocks = if clones {
        blocks_of(driver, &content, idmap)?
    } else {
        Blocks::Unpacked
    };
    let plan = plan_for(held, fill, &content, current, mode, written, blocks)?;
    Ok((content, Some(plan)))
}

/// Plans the fill of the measured `content` against the pool, and warns when `size` cannot be
/// enforced or the pool is overcommitted. `written`: what this request already unpacked into
/// the pool (an image volume or the new slot, in one pass), counted as free. `blocks`: where
/// the new volume's blocks come from (see [`blocks_of`]).
pub(super) fn plan_for(
    held: &mut LockedVolume<'_>,
    fill: &Fill,
    content: &Content,
    current: Option<&reimage_driver::Usage>,
    mode: Mode,
    written: Option<Tally>,
    blocks: Blocks,
) -> Result<Plan> {
    if let Some(item) = &content.measurement().unholdable {
        match fill.unsupported_metadata {
            UnsupportedMetadata::Fail => return Err(item.refusal()),
            UnsupportedMetadata::Warn => held.events.warning(Warning::XattrFailed, &item.warning()),
        }
    }
    let tally = content.measurement().tally;
    let driver = held.driver;
    let need = Need {
        bytes: tally.allocated_bytes,
        inodes: tally.inodes,
        blocks,
        fs_overhead: driver.fs_overhead(crate::plan::grown(tally.allocated_bytes, fill.headroom)),
    };
    let plan = plan_fill(
        driver.capabilities().size_model,
        fill,
        need,
        current,
        mode,
        space_before(driver, written)?,
    )?;
    if let (Some((provisioned, total)), Some(size)) = (plan.provisioned, plan.target_size) {
        // The old volume's promise goes away in a rebuild; it is still counted here, as it
        // stands until the swap.
        if provisioned.saturating_add(size) > total {
            held.events.warning(
                Warning::Overcommitted,
                &format!(
                    "the pool's volumes are promised {} bytes with this one, more than the {total} the pool has; writes fail when it fills up",
                    provisioned.saturating_add(size)
                ),
            );
        }
    }
    if plan.size_ignored {
        held.events.warning(
            Warning::SizeIgnored,
            &format!(
                "the {} driver cannot limit a volume's size on this pool; `size` is not enforced",
                driver.name()
            ),
        );
    }
    Ok(plan)
}

/// Sets the limit of a clone (of an image volume or a template's snapshot) in `slot`. A clone
/// takes no space of its own, but its limit counts what it shares: a size that may grow grows
/// to fit it; an exact one smaller than what it shares is the same failure an unpack would
/// have met (and zfs refuses to set it at all).
pub(super) fn size_clone(driver: &dyn Driver, slot: Slot<'_>, filling: &Filling<'_>) -> Result<()> {
    // A quota forced by the crash tests is exact.
    let forced = fault::quota_override();
    let (Some(size), reimage_driver::SizeModel::Quota) = (
        forced.or(filling.target_size),
        driver.capabilities().size_model,
    ) else {
        return Ok(());
    };
    let used = driver.usage(slot)?.used;
    let size = match (forced, filling.grow_to_fit) {
        (None, Some(headroom)) if used > size => crate::plan::grown(used, headroom),
        _ => size,
    };
    if used > size {
        let (code, limit, word) = if driver.capabilities().full_at_size {
            (Code::InsufficientSpace, "size", "the volume is full")
        } else {
            (Code::QuotaExceeded, "quota", "quota exceeded")
        };
        return Err(Error::new(
            code,
            format!(
                "the volume's {limit} of {size} bytes is smaller than the {used} bytes of what it is cloned from ({word})"
            ),
        )
        .with("volume_size", size)
        .with("measured", used));
    }
    driver.set_size(slot, size).map_err(Error::from)
}

/// The pool's space as the plan counts it: as it was before this request unpacked `written`
/// into it (a new image volume, or the new slot in one pass; the volume itself, a clone of an
/// image volume, takes none yet).
fn space_before(driver: &dyn Driver, written: Option<Tally>) -> Result<reimage_driver::PoolSpace> {
    let mut space = driver.pool_space()?;
    if let Some(tally) = written {
        space.available = space.available.saturating_add(tally.allocated_bytes);
        space.inodes_available = space
            .inodes_available
            .map(|free| free.saturating_add(tally.inodes));
    }
    Ok(space)
}

/// Unpacks `content` into the open root of the volume being built.
pub(super) fn unpack_into(
    events: &mut Events,
    root: &Mounted,
    content: &Content,
    idmap: &IdMap,
    skip: &[RelPath],
    metadata: UnsupportedMetadata,
) -> Result<()> {
    let Content::Image {
        file, measurement, ..
    } = content
    else {
        if !idmap.is_identity() {
            let owner = idmap.map(0).unwrap_or(0);
            rustix::fs::fchown(
                root.root(),
                Some(rustix::fs::Uid::from_raw(owner)),
                Some(rustix::fs::Gid::from_raw(owner)),
            )
            .map_err(|e| {
                Error::new(
                    Code::DriverError,
                    format!("chown of the new volume's root: {e}"),
                )
            })?;
        }
        return Ok(());
    };
    let options = unpack::Options {
        prefix: measurement.rootfs_prefix.clone(),
        idmap: idmap.clone(),
        skip: skip.to_vec(),
        expected_bytes: Some(measurement.tally.unpacked_bytes),
        unsupported_metadata: metadata,
    };
    let total = measurement.tally.unpacked_bytes;
    events.progress(EventPhase::Unpack, 0, total, Unit::Bytes);
    let detected = image::Detected {
        format: measurement.format,
        compression: measurement.compression,
    };
    let mut reader = image::open(file, detected)?;
    let mut observer = UnpackObserver { events, total };
    unpack::unpack(&mut *reader.archive, root.root(), &options, &mut observer)?;
    warn_skipped(events, reader.archive.skipped());
    Ok(())
}

/// A warning for each entry the reader passed over (squashfs sockets).
pub(super) fn warn_skipped(events: &mut Events, skipped: &[String]) {
    for socket in skipped {
        events.warning(
            Warning::SocketSkipped,
            &format!(
                "{socket} is a socket; sockets belong to running programs and are not unpacked"
            ),
        );
    }
}

/// A full volume, with the numbers that explain it: its size, what measure expected, and
/// what the filesystem had left in bytes and inodes when it refused.
pub(super) fn with_fill_numbers(
    driver: &dyn Driver,
    err: Error,
    root: &Mounted,
    content: &Content,
    size: Option<u64>,
) -> Error {
    if !matches!(err.code, Code::InsufficientSpace | Code::QuotaExceeded) {
        return err;
    }
    let mut err = err;
    if err.code == Code::InsufficientSpace && driver.capabilities().limit_reads_as_full {
        // The volume is full but the pool is not: that is the volume's limit.
        if driver.pool_space().is_ok_and(|s| s.available > 1 << 20) {
            err.code = Code::QuotaExceeded;
            err.message = format!(
                "{} — the volume's quota is exhausted (this filesystem reports it as a full disk)",
                err.message
            );
        }
    }
    let mut err = err
        .with("volume_size", size)
        .with("measured", content.measurement().tally.allocated_bytes);
    if let Ok(st) = rustix::fs::fstatvfs(root.root()) {
        err = err
            .with("free_bytes", st.f_bavail.saturating_mul(st.f_frsize))
            .with("free_inodes", st.f_favail);
    }
    err
}

pub(super) fn copy_preserved(
    events: &mut Events,
    old: &Mounted,
    new: &Mounted,
    preserved: &[RelPath],
    metadata: UnsupportedMetadata,
) -> Result<()> {
    events.progress(EventPhase::Preserve, 0, preserved.len() as u64, Unit::Paths);
    let mut missing = Vec::new();
    preserve::preserve(
        old.root(),
        new.root(),
        preserved,
        &mut |p| missing.push(p.shown()),
        &mut |path, failure| match metadata {
            UnsupportedMetadata::Fail => Err(unpack::unsupported_metadata(path, failure)),
            UnsupportedMetadata::Warn => {
                events.warning(
                    Warning::XattrFailed,
                    &format!(
                        "could not set xattr {} on {}: {}",
                        failure.name,
                        path.shown(),
                        std::io::Error::from(failure.errno)
                    ),
                );
                Ok(())
            }
        },
    )?;
    for p in missing {
        events.warning(
            Warning::PreserveMissing,
            &format!("{p} does not exist in the old volume; nothing to preserve"),
        );
    }
    events.progress(
        EventPhase::Preserve,
        preserved.len() as u64,
        preserved.len() as u64,
        Unit::Paths,
    );
    Ok(())
}

/// Syncs and closes the volume being built in `slot`, and returns its identity.
pub(super) fn seal(
    driver: &dyn Driver,
    events: &mut Events,
    root: Mounted,
    slot: Slot<'_>,
    timings: &mut Timings,
) -> Result<String> {
    events.progress(EventPhase::Sync, 0, 1, Unit::Steps);
    timings.time("sync", || driver.sync(slot, root.root()))?;
    root.release()?;
    events.progress(EventPhase::Sync, 1, 1, Unit::Steps);
    cancelled_check()?;
    driver
        .identity(slot)?
        .ok_or_else(|| Error::internal(format!("{slot} vanished before it was committed")))
}

pub(super) fn fill_result(
    driver: &dyn Driver,
    volume: &VolumeName,
    content: &Content,
    cache: Cache,
    timings: &Timings,
) -> Result<out::Filled> {
    Ok(out::Filled::Done(out::FillDone {
        volume: volume_info_with(driver, volume, false)?,
        image: content.to_info(Some(cache)),
        timings_ms: timings.to_ms(),
    }))
}

pub(super) fn dry_run_result(
    plan: &Plan,
    content: &Content,
    steps: &[&str],
    pending: bool,
) -> out::Filled {
    out::Filled::DryRun(out::DryRun {
        dry_run: true,
        plan: out::PlanInfo {
            measured_bytes: plan.need,
            needed_with_headroom: plan.need_with_headroom,
            target_size: plan.target_size,
            required_space: plan.required,
            available_space: plan.available,
            provisioned_space: plan.provisioned.map(|(p, _)| p),
            image_bytes: plan.image_bytes,
            steps: steps.iter().map(|s| (*s).to_owned()).collect(),
            pending_recovery: pending,
        },
        image: content.to_info(None),
    })
}

/// The volume as results describe it. `with_usage` false leaves `used` and `inodes` null for
/// drivers that would have to walk the whole tree to know them.
pub(super) fn volume_info(driver: &dyn Driver, volume: &VolumeName) -> Result<out::VolumeInfo> {
    volume_info_with(driver, volume, true)
}

pub(super) fn volume_info_with(
    driver: &dyn Driver,
    volume: &VolumeName,
    with_usage: bool,
) -> Result<out::VolumeInfo> {
    let usage = (with_usage || driver.capabilities().cheap_usage)
        .then(|| driver.usage(Slot::live(volume)))
        .transpose()?;
    let snapshots = driver.snapshots(Slot::live(volume))?;
    // Added to v1: what a manager mounts, for volumes that are layers (overlay).
    let mount = driver
        .mount_spec(Slot::live(volume))?
        .map(|spec| out::MountInfo {
            fstype: spec.fstype.to_owned(),
            options: spec
                .options
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect(),
        });
    Ok(out::VolumeInfo {
        name: volume.as_str().to_owned(),
        exists: true,
        state: Some(out::VolumeState {
            size: usage.as_ref().and_then(|u| u.size),
            used: usage.as_ref().map(|u| u.used),
            inodes: usage.as_ref().and_then(|u| u.inodes),
            snapshots,
            mount,
        }),
        pending_recovery: None,
        capabilities: None,
    })
}

/// A volume that does not exist (any more).
pub(super) fn no_volume(volume: &VolumeName) -> out::VolumeInfo {
    out::VolumeInfo {
        name: volume.as_str().to_owned(),
        exists: false,
        state: None,
        pending_recovery: None,
        capabilities: None,
    }
}

/// What a new slot is filled with: the content, its id map, the metadata policy, and the
/// plan's size (for messages when the volume fills up).
pub(super) struct Filling<'a> {
    pub(super) content: &'a Content,
    pub(super) idmap: &'a IdMap,
    pub(super) metadata: UnsupportedMetadata,
    pub(super) target_size: Option<u64>,
    /// The headroom to grow `target_size` by when a clone shares more than measure
    /// estimated (filesystem metadata of a small image), or `None` when the size is exact.
    pub(super) grow_to_fit: Option<f64>,
    /// For `Unmeasured` content: what the plan made once it is measured needs.
    pub(super) plan_later: Option<PlanLater<'a>>,
    /// The bytes an image volume of the content needs (the measure with headroom), for a
    /// driver that sizes it when it creates it.
    pub(super) image_size: Option<u64>,
}

/// What planning needs besides the measurement, for a fill measured while it unpacks.
#[derive(Clone, Copy)]
pub(super) struct PlanLater<'a> {
    pub(super) fill: &'a Fill,
    pub(super) current: Option<&'a reimage_driver::Usage>,
    pub(super) mode: Mode,
}

impl<'a> Filling<'a> {
    /// The filling of `content` (planned by `plan`, or to be planned once measured).
    pub(super) fn new(
        content: &'a Content,
        idmap: &'a IdMap,
        plan: Option<&Plan>,
        later: PlanLater<'a>,
    ) -> Filling<'a> {
        let fill = later.fill;
        Filling {
            content,
            idmap,
            metadata: fill.unsupported_metadata,
            target_size: plan.and_then(|p| p.target_size),
            grow_to_fit: (fill.size_policy != SizePolicy::Exact).then_some(fill.headroom),
            plan_later: plan.is_none().then_some(later),
            image_size: plan.map(|p| p.need_with_headroom.saturating_add(p.fs_overhead)),
        }
    }
}

/// The plan of measured content (every fill but one measured while it unpacks).
pub(super) fn planned(plan: Option<Plan>) -> Result<Plan> {
    plan.ok_or_else(|| Error::internal("a fill measured while it unpacks has no plan yet"))
}

/// The build's first step: the `New` slot created at the plan's size (fault point `created`
/// passed), and its root opened.
pub(super) fn create_new(
    held: &mut LockedVolume<'_>,
    target_size: Option<u64>,
    created: &str,
    timings: &mut Timings,
) -> Result<Mounted> {
    let (driver, volume) = (held.driver, held.volume);
    prepare_new(held, created, timings, || {
        driver
            .create(
                Slot::building(volume),
                fault::quota_override().or(target_size),
            )
            .map_err(Error::from)
    })
}

/// The `prepare` phase of every build: `make` puts the `New` slot in place (created, or
/// cloned and sized), fault point `created` is passed, and the slot's root is opened.
pub(super) fn prepare_new(
    held: &mut LockedVolume<'_>,
    created: &str,
    timings: &mut Timings,
    make: impl FnOnce() -> Result<()>,
) -> Result<Mounted> {
    held.events.progress(EventPhase::Prepare, 0, 1, Unit::Steps);
    timings.time("prepare", make)?;
    fault::point(created)?;
    let root = held.driver.open_root(Slot::building(held.volume))?;
    held.events.progress(EventPhase::Prepare, 1, 1, Unit::Steps);
    Ok(root)
}

/// Unpacks the content into `root`, leaving out the `skip` paths (already preserved).
pub(super) fn unpack_step(
    held: &mut LockedVolume<'_>,
    root: &Mounted,
    filling: &Filling<'_>,
    skip: &[RelPath],
    timings: &mut Timings,
) -> Result<()> {
    let driver = held.driver;
    let events = &mut *held.events;
    timings.time("unpack", || {
        unpack_into(
            events,
            root,
            filling.content,
            filling.idmap,
            skip,
            filling.metadata,
        )
        .map_err(|e| with_fill_numbers(driver, e, root, filling.content, filling.target_size))
    })
}

/// Copies the `preserved` paths, if any, from the old content (opened by `old`, released
/// afterwards) into `root`.
pub(super) fn preserve_step(
    held: &mut LockedVolume<'_>,
    old: impl FnOnce() -> reimage_driver::Result<Mounted>,
    root: &Mounted,
    preserved: &[RelPath],
    metadata: UnsupportedMetadata,
    timings: &mut Timings,
) -> Result<()> {
    if preserved.is_empty() {
        return Ok(());
    }
    let old = old()?;
    let events = &mut *held.events;
    timings.time("preserve", || {
        copy_preserved(events, &old, root, preserved, metadata)
    })?;
    old.release().map_err(Error::from)
}
